"""Fixtures of the server tests: one shared server (module tests start their own when they need
other options)."""
from __future__ import annotations

import pytest
from server_util import CHAT_TEMPLATE, Server

from reft.runtime.engine import Engine


@pytest.fixture(scope="session")
def chat_template_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("tmpl") / "chat.jinja"
    f.write_text(CHAT_TEMPLATE)
    return f


@pytest.fixture(scope="session")
def server(stories_plan, chat_template_file, tmp_path_factory):
    """One server shared by the API tests: 16 sequences per step, the plain chat template."""
    s = Server(stories_plan, tmp_path_factory.mktemp("srv"), "--chat-template", chat_template_file,
               "--max-num-seqs", "16", "--model-name", "stories")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    """The official openai client against the shared server."""
    return server.client()


@pytest.fixture(scope="module")
def engine(stories_plan):
    """The stories260K plan in-process: the oracle the served results are compared with."""
    return Engine.load(stories_plan)

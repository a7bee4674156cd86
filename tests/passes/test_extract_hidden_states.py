"""extract_hidden_states (`reftc compile --task embed`) on Before programs gives the Expected ones
(then dead-code elimination drops the head), and counts what it did."""
from __future__ import annotations

import pytest

from reft.errors import ModelError
from reft.ir import parse_graph, print_graph, verify
from reft.passes.context import PassContext
from reft.passes.manager import PassManager
from reft.passes.pipeline import TASKS

HEAD = """
graph forward {
  %0 = input() : float32[T,4] {name='x'}
  %1 = input() : int32[R] {name='logit_rows'}
  %2 = param() : float32[4] {name='model.norm.weight'}
  %3 = param() : float32[8,4] {name='lm_head.weight'}
  %4 = take_rows(%0, %1) : float32[R,4]
  %5 = rms_norm(%4, %2) : float32[R,4] {eps=1e-05}
  %6 = linear(%5, %3) : float32[R,8]
  %7 = softcap(%6) : float32[R,8] {cap=3.0}
  return logits=%7
}"""

EXPECTED = """
graph forward {
  %0 = input() : float32[T,4] {name='x'}
  %1 = input() : int32[R] {name='logit_rows'}
  %2 = param() : float32[4] {name='model.norm.weight'}
  %3 = take_rows(%0, %1) : float32[R,4]
  %4 = rms_norm(%3, %2) : float32[R,4] {eps=1e-05}
  return hidden_states=%4
}"""


def embed(src: str):
    g = parse_graph(src)
    verify(g)
    pm = PassManager(TASKS["embed"])
    return pm.run(g, PassContext()), pm.records


@pytest.mark.parametrize("head", [HEAD, HEAD.replace("%7 = softcap(%6) : float32[R,8] {cap=3.0}\n", "")
                                  .replace("logits=%7", "logits=%6")])
def test_logits_become_the_final_norm_and_the_head_goes(head):
    g, records = embed(head)
    assert print_graph(g) == print_graph(parse_graph(EXPECTED))
    assert records[0].counts == {"hidden_states_extracted": 1}
    assert records[1].counts == {"removed": 3 if "softcap" in head else 2}


def test_a_graph_without_logits_is_a_model_error():
    with pytest.raises(ModelError, match="--task embed needs a `logits` output"):
        embed(EXPECTED)

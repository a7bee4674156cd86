"""16 concurrent greedy streams: all complete, and each equals what its prompt gives alone."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

WORDS = ("Once upon a time there was a little girl named Lily who liked to play in the park with her dog and a big"
         " red ball").split()


def test_16_concurrent_greedy_streams_equal_alone(server):
    client = server.client()
    rng = np.random.default_rng(0)
    prompts = [" ".join(WORDS[:int(rng.integers(2, len(WORDS)))]) + f" {WORDS[i % len(WORDS)]}" for i in range(16)]
    lengths = [int(rng.integers(24, 64)) for _ in range(16)]

    def stream(i):
        chunks = client.completions.create(model="stories", prompt=prompts[i], temperature=0, max_tokens=lengths[i],
                                           stream=True, extra_body={"ignore_eos": True})
        text, reason = "", None
        for c in chunks:
            text += c.choices[0].text
            reason = c.choices[0].finish_reason or reason
        return text, reason

    alone = [client.completions.create(model="stories", prompt=p, temperature=0, max_tokens=n,
                                       extra_body={"ignore_eos": True}).choices[0].text
             for p, n in zip(prompts, lengths)]
    before = server.metric("reft_generation_tokens_total")
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(stream, range(16)))
    assert [r for _, r in together] == ["length"] * 16
    assert [t for t, _ in together] == alone
    assert server.metric("reft_generation_tokens_total") - before == sum(lengths)

"""Generation refuses impossible requests up front, with a named error, before any cache is allocated."""

import pytest
import torch

from adapters.generation import GenerationLengthError, SamplingConfig, generate
from adapters.multimodal import build_multimodal, multimodal_config


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": -5}, "max_new_tokens must be >= 1, got -5"),
    ({"temperature": -0.5}, "temperature must be >= 0"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
])
def test_sampling_config_refuses_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**kwargs)


def test_more_tokens_than_the_context_is_refused_before_decoding():
    torch.manual_seed(0)
    model = build_multimodal(multimodal_config("tiny")).eval()
    limit = model.cfg.lm.max_seq_len
    prompt = torch.zeros(1, 10, dtype=torch.long)
    with pytest.raises(GenerationLengthError, match=rf"prompt \(10 tokens\) plus max_new_tokens \({limit}\)"):
        next(generate(model, prompt, sampling=SamplingConfig(max_new_tokens=limit)))
    at_the_limit = torch.zeros(1, limit - 3, dtype=torch.long)
    assert len(list(generate(model, at_the_limit, sampling=SamplingConfig(max_new_tokens=3)))) == 3

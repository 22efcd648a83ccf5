"""mixtral: run, serve and chat with Mixtral-style sparse Mixture-of-Experts language models, locally.

    from mixtral import load, generate, SamplingParams
    model, tokenizer = load()                      # the shipped model, or a directory / Hub id
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Who goes there?"}])
    print(generate(model, tokenizer, ids, SamplingParams(temperature=0)))
"""

import os

# OpenMP's threads (torch's and our kernels', one pool) wait for work by spinning, 300,000 rounds by default,
# before they sleep; next to another busy process that spinning takes the cores the working threads need (the
# README has the numbers). Read once, when torch loads OpenMP, so set before torch is imported, and only where
# the user has not chosen.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from .config import ModelArgs, load_config  # noqa: E402
from .errors import MixtralError
from .generate import GenerationEvent, generate, generate_step, stream_generate
from .loading import load, load_model
from .sampling import SamplingParams
from .tokenizer import Tokenizer, load_tokenizer

__version__ = "0.1.0"
__all__ = ["GenerationEvent", "MixtralError", "ModelArgs", "SamplingParams", "Tokenizer", "generate",
           "generate_step", "load", "load_config", "load_model", "load_tokenizer", "stream_generate"]

"""mixtral: run, serve and chat with Mixtral-style sparse Mixture-of-Experts language models, locally.

    from mixtral import load, generate, SamplingParams
    model, tokenizer = load()                      # the shipped model, or a directory / Hub id
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Who goes there?"}])
    print(generate(model, tokenizer, ids, SamplingParams(temperature=0)))
"""

from .config import ModelArgs, load_config
from .errors import MixtralError
from .generate import GenerationEvent, generate, generate_step, stream_generate
from .loading import load, load_model
from .sampling import SamplingParams
from .tokenizer import Tokenizer, load_tokenizer

__version__ = "0.1.0"
__all__ = ["GenerationEvent", "MixtralError", "ModelArgs", "SamplingParams", "Tokenizer", "generate",
           "generate_step", "load", "load_config", "load_model", "load_tokenizer", "stream_generate"]

"""gpt1: train a GPT-style chat model from scratch on one machine, fine-tune it, serve it."""

from gpt1.core.config import ModelConfig
from gpt1.core.errors import Gpt1Error
from gpt1.core.model import GPT, KVCache
from gpt1.core.tokenizer import Tokenizer, train_tokenizer
from gpt1.inference.llm import LLM, load

__version__ = "0.1.0"
__all__ = ["GPT", "KVCache", "LLM", "ModelConfig", "Gpt1Error", "Tokenizer", "load", "train_tokenizer", "__version__"]

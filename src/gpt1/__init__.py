"""gpt1: train a GPT-style chat model from scratch on one machine, fine-tune it, serve it."""

from gpt1.config import ModelConfig
from gpt1.errors import Gpt1Error
from gpt1.llm import LLM, load
from gpt1.model import GPT, KVCache
from gpt1.tokenizer import Tokenizer, train_tokenizer

__version__ = "0.1.0"
__all__ = ["GPT", "KVCache", "LLM", "ModelConfig", "Gpt1Error", "Tokenizer", "load", "train_tokenizer", "__version__"]

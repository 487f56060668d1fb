"""Pretrained models on the tensor-parallel layers: BERT and sentence-transformers' encoders; GPT-2, Llama
and Qwen2 decoders with generation.

``AutoModelForCausalLM.from_pretrained(folder, config)`` loads a Hugging Face
decoder folder (``model_type`` ``gpt2``, ``llama`` or ``qwen2``) whose
``generate`` equals transformers' (greedy token for token; sampling keyed by
seed, step and vocabulary index, the same at every worker count).

``BertModel.from_pretrained(folder, config)`` loads a Hugging Face BERT
(``config.json`` + ``model.safetensors``); ``SentenceEncoder.from_pretrained``
a sentence-transformers BERT model such as all-MiniLM-L6-v2 (any folder that
sentence-transformers 2.x to 6.x writes: Transformer, Pooling in any of its
modes, Dense layers, Normalize), whose ``encode`` matches
``SentenceTransformer.encode``. Tokenising needs the
``tokenizers`` library (``pip install 'tp_gpu[models]'``), imported only when
an encoder is loaded: importing this package imports neither it nor tqdm.
"""

from .bert import BertModel, load_hf_weights
from .decoder import DecoderForCausalLM
from .decoder_checkpoint import DecoderCheckpoint, decoder_tensor_shapes, read_decoder_config
from .decoder_config import DecoderConfig, RopeScaling
from .decoder_loading import AutoModelForCausalLM, GPT2ForCausalLM, LlamaForCausalLM, Qwen2ForCausalLM
from .dense import DenseConfig
from .hf_loader import BertConfig, CheckpointReader, bert_tensor_shapes
from .pooling import POOLING_MODES, PoolingConfig
from .sampling import SamplingConfig, greedy_tokens, next_tokens, sample_tokens
from .sentence import SentenceEncoder, packaged_model_dir
from .st_files import MissingDependencyError, SentenceConfig, read_sentence_config
from .text_generation import TextGenerator

__all__ = [
    "AutoModelForCausalLM",
    "DecoderCheckpoint",
    "DecoderConfig",
    "DecoderForCausalLM",
    "GPT2ForCausalLM",
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "RopeScaling",
    "SamplingConfig",
    "TextGenerator",
    "decoder_tensor_shapes",
    "greedy_tokens",
    "next_tokens",
    "read_decoder_config",
    "sample_tokens",
    "BertConfig",
    "BertModel",
    "CheckpointReader",
    "DenseConfig",
    "MissingDependencyError",
    "POOLING_MODES",
    "PoolingConfig",
    "SentenceConfig",
    "SentenceEncoder",
    "bert_tensor_shapes",
    "load_hf_weights",
    "packaged_model_dir",
    "read_sentence_config",
]

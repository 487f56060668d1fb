"""Pretrained models on the tensor-parallel layers: BERT and sentence-transformers' encoders.

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
from .dense import DenseConfig
from .hf_loader import BertConfig, CheckpointReader, bert_tensor_shapes
from .pooling import POOLING_MODES, PoolingConfig
from .sentence import SentenceEncoder, packaged_model_dir
from .st_files import MissingDependencyError, SentenceConfig, read_sentence_config

__all__ = [
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

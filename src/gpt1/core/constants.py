"""Values that two sides of gpt1 share and that importing loads nothing for: `gpt1 --help` builds
every command's parser from here without loading torch, numpy or FastAPI.

Names that the torch side (the model, its folder) and the torch-free side (`gpt1 prepare`, `gpt1
tokenizer`) share: `gpt1 prepare` imported torch only for the first two, 2-5 s of a small
preparation. Also importable from their first homes, `gpt1.core.model` and `gpt1.formats.modeldir`.

The defaults of a library function that a command's flags restate: one value, here, for both
(`gpt1.data.prepare.prepare` and `gpt1 prepare`; `gpt1.serve.create_app` and `gpt1 serve`).
"""

IGNORE_INDEX = -100  # label value excluded from the loss (the convention of PyTorch and HF)
DATA_META_FILE = "meta.json"  # marks a prepared data dir (see gpt1.data.shards)
# The thread an interrupted BPE training is left running in (gpt1.core.tokenizer): the CLI ends
# the process without the interpreter's shutdown while it is alive (see gpt1.cli.run).
BPE_TRAINING_THREAD = "bpe-training"

# `prepare`: the validation split, a fraction of the documents (< 1) or their number (>= 1); the seed
# of its (deterministic) choice; the documents per tokenizer batch.
PREPARE_VAL = 0.0005
PREPARE_SEED = 1337
PREPARE_BATCH_DOCS = 1024

# `serve`: requests generating at once (the KV-cache slots) and waiting beyond those; the most prompt
# positions prefilled per engine step; the time a request body has to arrive; how often a stream writes.
SERVE_MAX_BATCH = 16
SERVE_MAX_QUEUE = 64
SERVE_PREFILL_CHUNK = 256
SERVE_BODY_TIMEOUT_S = 30.0
SERVE_STREAM_INTERVAL_MS = 0.0

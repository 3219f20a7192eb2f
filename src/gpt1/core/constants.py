"""Names that the torch side (the model, its folder) and the torch-free side (`gpt1 prepare`,
`gpt1 tokenizer`) share. Importing this loads nothing: `gpt1 prepare` imported torch only for
these two, 2-5 s of a small preparation. Also importable from their first homes,
`gpt1.core.model` and `gpt1.formats.modeldir`."""

IGNORE_INDEX = -100  # label value excluded from the loss (the convention of PyTorch and HF)
DATA_META_FILE = "meta.json"  # marks a prepared data dir (see gpt1.data.shards)
# The thread an interrupted BPE training is left running in (gpt1.core.tokenizer): the CLI ends
# the process without the interpreter's shutdown while it is alive (see gpt1.cli.run).
BPE_TRAINING_THREAD = "bpe-training"

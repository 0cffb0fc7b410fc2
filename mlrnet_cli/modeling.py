"""Loading classifiers safely and reading the [CLS]/pooled features their heads consume.

Every stage that runs a Hugging Face ``AutoModelForSequenceClassification`` goes through this module: devices
and bf16 autocast; loading (safetensors only unless ``allow_pickle``, remote code only with ``trust_remote_code``,
a one-line error for anything that cannot be loaded, offline in seconds); the head's input feature (what the
MLRNet meta-net reads, paper §3.3/§4.3) and the head alone on cached features (``--freeze-encoder``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from mlrnet_cli.artifacts import fingerprint_bytes, fingerprint_files, read_json
from mlrnet_cli.errors import ArtifactError, ConfigError, HubUnavailableError, ModelError

log = logging.getLogger("mlrnet")

#: Files whose bytes define a local model + tokenizer (the rest, e.g. README.md, do not change results).
_MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".bin", ".txt", ".model")
_IGNORED_MODEL_FILES = {"history.json", "mlrnet.json", "README.md"}


# ---------------------------------------------------------------------------------------------
# devices


def select_device(spec: str = "auto") -> torch.device:
    """``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; ConfigError if unusable."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"unknown device {spec!r}", "use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {spec!r} requested but CUDA is not available", "use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {spec!r} does not exist", f"this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif device.type != "cpu":
        raise ConfigError(f"unsupported device {spec!r}", "use auto, cpu, cuda or cuda:N")
    return device


def autocast_context(device: torch.device, bf16: bool = True) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA devices that support it (and TF32 matmuls); ``nullcontext`` on CPU or with ``bf16`` off.

    Losses should be computed from ``logits.float()`` outside or inside this context alike.
    """
    if device.type != "cuda" or not bf16:
        return contextlib.nullcontext()
    torch.set_float32_matmul_precision("high")  # TF32 tensor cores for fp32 matmuls (Ampere+)
    torch.backends.cudnn.allow_tf32 = True
    if torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host→device copy of a batch: through pinned memory and ``non_blocking`` on CUDA (the copy overlaps
    the running kernels, no sync); ``t`` itself on CPU."""
    if device.type != "cuda" or t.device.type == "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Run with every submodule in eval mode (no dropout), then give each module back its own train/eval flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def math_attention() -> contextlib.AbstractContextManager[Any]:
    """Force the math SDPA kernel: the CPU flash kernel has no double backward and no forward-mode AD."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


# ---------------------------------------------------------------------------------------------
# loading


@contextlib.contextmanager
def _hf_errors_only() -> Iterator[None]:
    """transformers' multi-line load report would flood stderr; :func:`load_classifier` logs one line instead."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def _local_path(name_or_path: str | os.PathLike[str]) -> Path | None:
    """The local folder ``name_or_path`` names (``~`` expanded), or None for a hub id."""
    s = str(name_or_path)
    path = Path(s).expanduser()
    return path if path.exists() or s.startswith((".", "/", "~")) or s.endswith(os.sep) else None


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the hub endpoint, so an offline machine fails in seconds, not after retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return False
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_unavailable(name: str) -> HubUnavailableError:
    return HubUnavailableError(
        f"cannot load model {name!r}: it is not a local folder and the model hub is unreachable "
        "(offline machine, or not in the local cache)",
        "pass --model PATH to a local model folder (one that holds config.json and the weights)",
    )


def _from_pretrained(load: Any, name: str, local: bool) -> Any:
    """``load(name)``. A hub id that is not cached locally needs the hub: it is probed first, so an offline machine
    gets one HubUnavailableError in seconds instead of the hub client's retries."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if not local:
        try:
            load(name, local_files_only=True)
        except Exception:
            if not _hub_reachable():
                raise _hub_unavailable(name) from None
    try:
        return load(name)
    except OSError as e:
        if not local and "connect" in str(e).lower():
            raise _hub_unavailable(name) from e
        raise


def _pickle_hint(pickle_option: bool) -> str:
    """What to do about pickle-only weights: `--allow-pickle` where the command has it (collect-losses, train)."""
    if pickle_option:
        return "convert it to safetensors, or pass --allow-pickle if you trust its source"
    return "convert it to safetensors: load it, then save_pretrained with safe_serialization=True"


def _check_model_folder(path: Path, *, allow_pickle: bool, pickle_option: bool = True) -> None:
    if not path.is_dir():
        raise ModelError(f"model path {path} is not a folder", "pass a folder made by save_pretrained or a hub id")
    if not (path / "config.json").is_file():
        raise ModelError(
            f"{path} is not a model folder (no config.json)", "pass a folder made by save_pretrained or a hub id"
        )
    has_st = any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file()
    has_pickle = any(path.glob("pytorch_model*.bin"))
    if not has_st and has_pickle and not allow_pickle:
        raise ModelError(
            f"{path} holds only pickle weights (pytorch_model.bin), which can run code when loaded",
            _pickle_hint(pickle_option),
        )
    if not has_st and not has_pickle:
        raise ModelError(f"{path} has no model weights (no *.safetensors)", "pass a folder made by save_pretrained")


def load_tokenizer(name_or_path: str | os.PathLike[str], *, trust_remote_code: bool = False) -> Any:
    """A *fast* tokenizer for a local folder or hub id; HubUnavailableError (naming ``--model PATH``) offline.

    A model folder saved without a tokenizer gets the one of the pretrained model its metadata names."""
    try:
        return _load_fast_tokenizer(name_or_path, trust_remote_code)
    except ModelError:
        base = trained_settings(name_or_path).get("model")
        if base is None or base == str(name_or_path):
            raise
        log.debug("%s has no tokenizer: using the one of %s", name_or_path, base)
        return _load_fast_tokenizer(base, trust_remote_code)


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's padding id (0 for one without a pad token: the attention mask hides the padding)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def stage_meta(folder: Path) -> dict[str, Any]:
    """The mlrnet metadata a stage saved in a model folder (empty for a folder mlrnet did not write)."""
    try:
        meta = read_json(folder / "mlrnet.json").get("mlrnet") if (folder / "mlrnet.json").is_file() else None
    except (ArtifactError, AttributeError):
        meta = None
    return meta if isinstance(meta, dict) else {}


def trained_settings(name_or_path: str | os.PathLike[str]) -> dict[str, Any]:
    """What the stage that saved a model folder recorded: ``model`` (the pretrained base), ``max_length`` and
    ``batch_size``; empty for a hub id or a folder mlrnet did not write."""
    cfg = stage_meta(Path(name_or_path)).get("config")
    if not isinstance(cfg, dict):
        return {}
    return {k: cfg[k] for k in ("model", "max_length", "batch_size") if cfg.get(k) is not None}


def _load_fast_tokenizer(name_or_path: str | os.PathLike[str], trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    name = str(name_or_path)
    path = _local_path(name)
    if path is not None:
        if not path.is_dir():
            raise ModelError(f"model folder not found: {path}", "pass --model PATH to a folder or a hub id")
        if not any((path / f).is_file() for f in ("config.json", "tokenizer.json", "tokenizer_config.json")):
            raise ModelError(
                f"{path} is not a model folder (no config.json, no tokenizer)",
                "pass --model a folder made by save_pretrained or a hub id",
            )
    try:
        tok = _from_pretrained(
            lambda n, **kw: AutoTokenizer.from_pretrained(n, use_fast=True, trust_remote_code=trust_remote_code, **kw),
            str(path or name),
            path is not None,
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"cannot load a tokenizer from {name!r}: {_first_line(e)}") from e
    if not getattr(tok, "is_fast", False):
        raise ModelError(f"{name!r} has no fast tokenizer", "use a model with a tokenizer.json")
    return tok


def load_config(name_or_path: str | os.PathLike[str], *, trust_remote_code: bool = False) -> Any:
    """A model's ``AutoConfig`` (offline: one HubUnavailableError in seconds, see :func:`_from_pretrained`)."""
    from transformers import AutoConfig

    path = _local_path(name_or_path)
    name = str(path or name_or_path)
    try:
        return _from_pretrained(
            lambda n, **kw: AutoConfig.from_pretrained(n, trust_remote_code=trust_remote_code, **kw), name, bool(path)
        )
    except OSError as e:
        raise ModelError(f"cannot read the model config of {name!r}: {_first_line(e)}") from e
    except (ValueError, KeyError) as e:
        raise ModelError(f"{name!r} is not a model this transformers version knows: {_first_line(e)}") from e


def load_classifier(
    name_or_path: str | os.PathLike[str],
    num_labels: int,
    class_names: Sequence[str] | None = None,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    init_seed: int | None = None,
    pickle_option: bool = True,
) -> torch.nn.Module:
    """An ``AutoModelForSequenceClassification`` in fp32 with ``num_labels`` outputs, loaded safely.

    Weights load from safetensors only unless ``allow_pickle``; remote code runs only with
    ``trust_remote_code``. A checkpoint that already has a trained classification head must have
    ``num_labels`` outputs (ModelError otherwise); a checkpoint without one gets a new head,
    initialised from ``init_seed`` when given (so the same seed gives the same model).
    ``id2label``/``label2id`` come from ``class_names``. ``pickle_option``: whether the calling command has
    ``--allow-pickle`` to suggest.
    """
    from safetensors import SafetensorError  # a truncated or corrupt model.safetensors
    from transformers import AutoModelForSequenceClassification

    if num_labels < 2:
        raise ConfigError(f"a classifier needs at least 2 labels, got {num_labels}")
    path = _local_path(name_or_path)
    if path is not None:
        if not path.exists():
            raise ModelError(f"model folder not found: {path}", "pass --model PATH to a folder or a hub id")
        _check_model_folder(path, allow_pickle=allow_pickle, pickle_option=pickle_option)
    name = str(path or name_or_path)
    config = load_config(name, trust_remote_code=trust_remote_code)
    archs = list(getattr(config, "architectures", None) or [])
    has_head = any(a.endswith("ForSequenceClassification") for a in archs)
    if has_head and config.num_labels != num_labels:
        raise ModelError(
            f"model {name!r} has a trained {config.num_labels}-label classification head but the data has "
            f"{num_labels} classes",
            "use the base model (without a classification head) or data with the same classes",
        )
    kwargs: dict[str, Any] = {"num_labels": num_labels, "dtype": torch.float32, "trust_remote_code": trust_remote_code}
    kwargs |= {"use_safetensors": None if allow_pickle else True}
    if class_names is not None:  # otherwise keep the checkpoint's own names
        names = [str(n) for n in class_names]
        if len(names) != num_labels:
            raise ConfigError(f"{len(names)} class names for {num_labels} labels")
        kwargs.update(id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    rng = torch.random.fork_rng(devices=[]) if init_seed is not None else contextlib.nullcontext()
    try:
        with rng, _hf_errors_only():
            if init_seed is not None:
                torch.manual_seed(init_seed)
            model, info = AutoModelForSequenceClassification.from_pretrained(name, output_loading_info=True, **kwargs)
    except OSError as e:
        msg = str(e)
        if "safetensors" in msg and not allow_pickle:
            raise ModelError(
                f"{name!r} has no safetensors weights (only pickle files, which can run code when loaded)",
                _pickle_hint(pickle_option),
            ) from e
        if path is None and "connect" in msg.lower():
            raise _hub_unavailable(name) from e
        raise ModelError(f"cannot load model {name!r}: {_first_line(e)}") from e
    except (ValueError, RuntimeError, KeyError, SafetensorError) as e:
        raise ModelError(f"cannot load model {name!r} as a sequence classifier: {_first_line(e)}") from e
    new = sorted(info.get("missing_keys") or [])
    head = head_name(model) + "."
    # the non-head weights that were new (random, from init_seed): see encoder_cache_id
    model._mlrnet_new_encoder_weights = [k for k in new if not k.startswith(head)]  # type: ignore[assignment]
    if model._mlrnet_new_encoder_weights:  # a missing encoder weight changes results: say so loudly
        log.warning(
            "%s: %d weight(s) not in the checkpoint, initialised at random: %s", name, len(new), ", ".join(new[:6])
        )
    elif new:
        log.debug("%s: new classification head (%s)", name, ", ".join(new))
    if info.get("unexpected_keys"):
        log.debug("%s: unused checkpoint weights: %s", name, ", ".join(sorted(info["unexpected_keys"])[:6]))
    return model


def encoder_cache_id(model: torch.nn.Module, model_fp: str, init_seed: int | None) -> str:
    """The ``model_id`` for feature caches: the checkpoint fingerprint, plus the init seed only when
    :func:`load_classifier` had to initialise non-head weights (e.g. a missing pooler) at random."""
    return f"{model_fp}/init-seed-{init_seed}" if getattr(model, "_mlrnet_new_encoder_weights", None) else model_fp


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def model_fingerprint(name_or_path: str | os.PathLike[str], revision: str = "main") -> str:
    """Cache key of a model: a local folder's config/weights/tokenizer bytes, or ``hub:<id>@<revision>``."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        keep = [f for f in sorted(path.iterdir()) if f.is_file() and f.suffix in _MODEL_FILE_SUFFIXES]
        return "dir:" + fingerprint_files(path, [f for f in keep if f.name not in _IGNORED_MODEL_FILES])
    return "hub:" + fingerprint_bytes(f"{name}@{revision}".encode())


# ---------------------------------------------------------------------------------------------
# the head and its input


def head_module(model: torch.nn.Module) -> torch.nn.Module:
    """The classification head (``model.classifier`` for BERT/RoBERTa/DeBERTa/DistilBERT/ELECTRA-style models)."""
    head = getattr(model, "classifier", None)
    if not isinstance(head, torch.nn.Module):
        raise ModelError(
            f"{type(model).__name__} has no `classifier` head module",
            "use a BERT-family encoder (BERT, RoBERTa, DeBERTa, DistilBERT, ELECTRA, MiniLM)",
        )
    return head


def head_name(model: torch.nn.Module) -> str:
    """The head's attribute path in ``model.named_parameters()`` (``"classifier"``)."""
    head = head_module(model)
    return next(name for name, mod in model.named_modules() if mod is head)


def features_and_logits(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward: (the head's input feature [B, H], the logits [B, C]) (paper §4.3, the [CLS] feature of DF_i).

    The feature is captured with a forward pre-hook on :func:`head_module`, so it is exactly what the head
    consumes (for BERT: the pooled [CLS] vector after the pooler and, in train mode, dropout; for heads that
    take the token sequence, its first position). It is not detached: detach it for a stop-gradient.
    """
    head = head_module(model)
    captured: list[torch.Tensor] = []

    def hook(_mod: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else next(iter(kwargs.values()))
        model._mlrnet_head_takes_sequence = x.dim() == 3  # type: ignore[assignment]
        captured.append(x[:, 0] if x.dim() == 3 else x)

    with head.register_forward_pre_hook(hook, with_kwargs=True):  # the handle removes the hook on exit
        out = model(input_ids=input_ids, attention_mask=attention_mask)
    if not captured:
        raise ModelError(f"the head of {type(model).__name__} was not called in the forward")  # pragma: no cover
    return captured[-1], out.logits


def head_takes_sequence(model: torch.nn.Module) -> bool:
    """True for heads that read the token sequence themselves (RoBERTa-style ``features[:, 0, :]``)."""
    seen = getattr(model, "_mlrnet_head_takes_sequence", None)
    if seen is not None:
        return bool(seen)
    head = head_module(model)
    return not isinstance(head, torch.nn.Linear) and hasattr(head, "dense") and hasattr(head, "out_proj")


def head_logits(model: torch.nn.Module, features: torch.Tensor) -> torch.Tensor:
    """The head alone on head-input features [B, H] -> logits [B, C] (``--freeze-encoder`` training)."""
    return head_module(model)(features[:, None, :] if head_takes_sequence(model) else features)

"""Loading CLIP models through open_clip: names, pretrained tags, Hugging Face Hub and local files.

The one rule here: a model is never returned with random weights unless the caller asked for
``pretrained=None``. Every other failure (no network, missing file, wrong architecture) raises
:class:`CLIPLoadError` with a message that says what to do.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import urllib.request
import warnings
import zipfile
from collections.abc import Callable, Mapping
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

import open_clip
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from clipdense.checkpoints import skip_init, state_dict_mismatch
from clipdense.fileio import file_sha256

logger = logging.getLogger(__name__)

# Keys that OpenAI's TorchScript archives carry besides the weights.
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


@dataclass(frozen=True)
class PackagedWeights:
    """Weights that ship inside this package.

    Attributes:
        file: File name under ``clipdense/weights/``.
        sha256: Hex SHA-256 of the file, verified at every load.
        inference: Inference settings these weights were made for (``SegmenterConfig`` fields), used by
            the CLI where the user gives none: a model trained on small synthetic scenes wants its own
            image size and prompt, not the successors' protocol for web-scale CLIPs.
        description: One line for users ("which model did I just use?").
    """

    file: str
    sha256: str
    inference: Mapping[str, object] = field(default_factory=dict)
    description: str = ""


#: Pretrained tags whose weights ship inside this package: (model name, tag) -> weights.
PACKAGED_WEIGHTS: dict[tuple[str, str], PackagedWeights] = {
    ("ShapesCLIP-RN", "shapesworld"): PackagedWeights(
        file="shapesclip_rn.safetensors",
        sha256="56a628e075e71e71e96adefae227a87e5991e09ce9617eb750ece77538b3226e",
        inference={"short_side": 128, "window": None, "templates": "single"},
        description="ShapesCLIP-RN trained on ShapesWorld (the offline default; knows coloured shapes only)",
    )
}


class CLIPLoadError(RuntimeError):
    """A CLIP model or its weights could not be loaded; the message says how to fix it."""


@dataclass
class LoadedCLIP:
    """An open_clip model with what is needed to use it for dense prediction.

    Attributes:
        model: The open_clip ``CLIP`` module, in eval mode.
        tokenizer: open_clip tokenizer for this model (callable on a list of strings).
        name: Model name as given (e.g. ``"RN50"``, ``"hf-hub:org/repo"``).
        pretrained: The tag or file the weights came from; None for random weights.
        mean: Per-channel RGB mean for input normalisation.
        std: Per-channel RGB std for input normalisation.
        quick_gelu: Whether the model uses QuickGELU (OpenAI weights need it).
        fingerprint: Short id of the weights, used to key caches (text embeddings).
        inference: Inference settings the weights were made for (empty: the library's defaults).
        description: What the model is, in one line (shipped weights only).
    """

    model: torch.nn.Module
    tokenizer: Callable
    name: str
    pretrained: str | None
    mean: tuple[float, float, float] = OPENAI_DATASET_MEAN
    std: tuple[float, float, float] = OPENAI_DATASET_STD
    quick_gelu: bool = False
    fingerprint: str = field(default="")
    inference: Mapping[str, object] = field(default_factory=dict)
    description: str = ""

    @property
    def is_resnet(self) -> bool:
        return hasattr(self.model.visual, "attnpool")

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)


def register_model_configs() -> None:
    """Make clipdense's own architectures (e.g. ``ShapesCLIP-RN``) known to open_clip."""
    cfg_dir = resources.files("clipdense.clip") / "model_configs"
    with resources.as_file(cfg_dir) as path:
        if open_clip.get_model_config("ShapesCLIP-RN") is None or open_clip.get_model_config("ShapesCLIP-ViT") is None:
            open_clip.add_model_config(path)


def _is_torchscript_archive(path: Path) -> bool:
    """OpenAI's ``.pt`` files are TorchScript archives: zip files that carry a ``code/`` folder."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any("/code/" in name for name in zf.namelist())


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], bool]:
    """Read CLIP weights from a local file without executing pickled code.

    Supports OpenAI TorchScript archives (``RN50.pt``), open_clip/PyTorch state dicts
    (``.pt``/``.pth``/``.bin``, optionally under a ``state_dict`` key and with ``module.``
    prefixes) and ``.safetensors``.

    Args:
        path: Checkpoint file.

    Returns:
        The state dict and whether the file was an OpenAI TorchScript archive.
    """
    path = Path(path)
    if not path.is_file():
        raise CLIPLoadError(f"checkpoint file not found: {path}")
    is_openai_jit = False
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        elif _is_torchscript_archive(path):
            is_openai_jit = True
            with warnings.catch_warnings():  # TorchScript is deprecated, but it is OpenAI's format
                warnings.simplefilter("ignore", FutureWarning)
                state = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except CLIPLoadError:
        raise
    except Exception as e:  # corrupt file, pickle with code, unknown format
        raise CLIPLoadError(
            f"could not read CLIP weights from {path}: {type(e).__name__}: {e}. Expected an OpenAI .pt "
            "(TorchScript), an open_clip state dict (.pt/.pth/.bin) or a .safetensors file."
        ) from e
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CLIPLoadError(f"{path} does not hold a CLIP state dict (a mapping of names to tensors)")
    state = {k.removeprefix("module."): v for k, v in state.items() if k not in _OPENAI_EXTRA_KEYS}
    return state, is_openai_jit


def _load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str, name: str) -> None:
    """Load ``state`` into ``model``; any missing key or shape mismatch is an error, extra keys a warning."""
    if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    if getattr(model, "logit_bias", None) is None:
        state.pop("logit_bias", None)
    missing, unexpected, mismatched = state_dict_mismatch(model, state)
    if missing or mismatched:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if mismatched:
            k = mismatched[0]
            detail.append(
                f"{len(mismatched)} shape mismatches (e.g. {k}: checkpoint {tuple(state[k].shape)} "
                f"vs model {tuple(model.state_dict()[k].shape)})"
            )
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        raise CLIPLoadError(
            f"the weights in {source} do not fit the architecture '{name}': {'; '.join(detail)}. "
            "Pass the model name that matches the checkpoint (e.g. --model RN50 for OpenAI's RN50.pt)."
        )
    if unexpected:
        logger.warning("ignoring %d unexpected keys in %s: %s", len(unexpected), source, unexpected[:5])
    unexpected_keys = set(unexpected)
    model.load_state_dict({k: v for k, v in state.items() if k not in unexpected_keys}, strict=True)


@contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _fingerprint(*parts: object) -> str:
    return hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:16]


def _verified_packaged_file(name: str, tag: str, packaged: PackagedWeights) -> Path:
    """The shipped weights file, after checking that it is there and is the file that was shipped."""
    weights = Path(str(resources.files("clipdense") / "weights" / packaged.file))
    if not weights.is_file():
        raise CLIPLoadError(
            f"the {name}/{tag} weights are not in this installation (expected {weights}). Reinstall clipdense, "
            "or train them with `clipdense shapesworld train` and pass the resulting .safetensors file as "
            "--pretrained PATH."
        )
    found = file_sha256(weights)
    if found != packaged.sha256:
        raise CLIPLoadError(
            f"the {name}/{tag} weights file {weights} is damaged or was replaced (sha256 {found[:12]}..., "
            f"expected {packaged.sha256[:12]}...). Reinstall clipdense, or pass your own weights as --pretrained PATH."
        )
    return weights


def _cached_or_reachable(what: str, cfg: Mapping[str, str], cache_dir: str | None, fix: str) -> str | None:
    """The file ``open_clip.download_pretrained(cfg)`` would give, if it is on disk already; else a network check.

    Looks where open_clip would, in its order (the Hub's safetensors alternative, the Hub file, then a URL's
    download target), without touching the network. When nothing is cached, one quick connection to the host
    that would be contacted replaces the Hub client's minute of retries when there is no network.

    Args:
        what: Subject of the error message ("the weights for RN50/openai are").
        cfg: An open_clip pretrained config (``hf_hub``, ``url`` or ``file`` entry).
        cache_dir: Download cache, as passed to open_clip (None: its defaults).
        fix: What the user can do instead, appended to the error message.

    Returns:
        The cached file, or None when it is not cached and the host answers.

    Raises:
        CLIPLoadError: Not cached, and Hub offline mode is on (``HF_HUB_OFFLINE``) or the host cannot be reached.
    """
    if cfg.get("file"):
        return cfg["file"]
    hub, url = cfg.get("hf_hub", ""), cfg.get("url", "")
    if hub:
        repo_id, filename = os.path.split(hub)
        filename = filename or open_clip.pretrained.HF_WEIGHTS_NAME
        for candidate in (*open_clip.pretrained._get_safe_alternatives(filename), filename):
            if isinstance(found := try_to_load_from_cache(repo_id, candidate, cache_dir=cache_dir), str):
                return found
    target = Path(cache_dir or "~/.cache/clip").expanduser() / os.path.basename(url)
    if url and target.is_file():
        with suppress(Exception):  # a damaged file: open_clip fetches it again, after the check below
            return open_clip.pretrained.download_pretrained_from_url(url, cache_dir=cache_dir)
    where = "the Hugging Face cache" if hub else str(target.parent)
    if hf_constants.is_offline_mode():
        raise CLIPLoadError(f"{what} not in {where}, and offline mode is on (HF_HUB_OFFLINE is set). {fix}")
    server = urlsplit(hf_constants.ENDPOINT if hub else url)
    host, port = server.hostname, server.port or (443 if server.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(server.scheme)
    if proxy and not urllib.request.proxy_bypass(host):  # the download would connect to the proxy
        server = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = server.hostname, server.port or 80
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError as e:
        raise CLIPLoadError(
            f"{what} not in {where}, and {host} cannot be reached ({e}): no network? {fix} "
            "Set HF_HUB_OFFLINE=1 to skip this network check."
        ) from e
    return None


def _download_tag(name: str, tag: str, cfg: dict, cache_dir: str | None) -> str:
    fix = (
        f"Download the checkpoint on a machine with network access and pass its path (--pretrained PATH / "
        f"load_clip('{name}', '/path/to/weights.pt')), or put it in the Hugging Face cache."
    )
    if path := _cached_or_reachable(f"the weights for {name}/{tag} are", cfg, cache_dir, fix):
        return path
    try:
        path = open_clip.download_pretrained(cfg, cache_dir=cache_dir)
    except Exception as e:
        raise CLIPLoadError(f"no weights for {name}/{tag} found offline or online ({type(e).__name__}). {fix}") from e
    if not path:
        raise CLIPLoadError(f"open_clip has no download location for {name}/{tag}; pass a local file path")
    return path


def load_clip(
    name: str,
    pretrained: str | os.PathLike | None,
    *,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    quick_gelu: bool | None = None,
    cache_dir: str | None = None,
) -> LoadedCLIP:
    """Load a CLIP model for dense prediction.

    Args:
        name: An open_clip architecture (``"RN50"``, ``"ViT-B-16"``, ``"RN50-quickgelu"``,
            ``"ShapesCLIP-RN"``), ``"hf-hub:org/repo"`` or ``"local-dir:/path"`` (open_clip config
            and weights in one folder).
        pretrained: A pretrained tag of that architecture (``"openai"``, ``"laion2b_s34b_b88k"``,
            ``"shapesworld"``), a local checkpoint file (OpenAI TorchScript ``.pt``, open_clip state
            dict, ``.safetensors``), or None for random weights (the only way to get them). Must be
            None for ``hf-hub:``/``local-dir:`` names, which carry their own weights.
        device: Device for the model.
        precision: open_clip precision string (``"fp32"``, ``"fp16"``, ``"bf16"``).
        quick_gelu: Force QuickGELU on or off. By default it is on for OpenAI weights (the
            ``openai`` tag or a TorchScript archive), for ``-quickgelu`` names and for tags trained
            with it; off otherwise.
        cache_dir: Download cache for tags and the Hub.

    Returns:
        The model in eval mode with its tokenizer and preprocessing statistics.

    Raises:
        CLIPLoadError: The weights cannot be found or do not fit the architecture.
    """
    register_model_configs()
    schema = name.split(":", 1)[0] if name.startswith(("hf-hub:", "local-dir:")) else None
    mean, std = OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    packaged: PackagedWeights | None = None

    if schema is not None:
        if pretrained is not None:
            raise CLIPLoadError(f"'{name}' carries its own weights: pass pretrained=None with it")
        identifier = name.split(":", 1)[1]
        source = name
        if schema == "hf-hub":
            fix = "Download the repo on a machine with network access and use 'local-dir:/path/to/it'."
            what = f"the files of {name} are"
            config = _cached_or_reachable(what, {"hf_hub": f"{identifier}/open_clip_config.json"}, cache_dir, fix)
            weights = config and _cached_or_reachable(what, {"hf_hub": f"{identifier}/"}, cache_dir, fix)
            if config and weights:  # build from the cached snapshot: the Hub client would ask the network first
                source = f"local-dir:{Path(config).parent}"
        if source.startswith("hf-hub:"):
            try:
                open_clip.pretrained.download_pretrained_from_hf(identifier, cache_dir=cache_dir)
            except Exception as e:
                raise CLIPLoadError(
                    f"no weights for {name} found in the Hugging Face cache and the Hub is not reachable "
                    f"({type(e).__name__}). Download the repo elsewhere and use 'local-dir:/path/to/it'."
                ) from e
        elif not any(any(Path(source[len("local-dir:") :]).glob(p)) for p in ("*.safetensors", "*.bin", "*.pth")):
            raise CLIPLoadError(f"no weights (*.safetensors, *.bin, *.pth) next to the config in '{identifier}'")
        try:
            model = open_clip.create_model(source, device=device, precision=precision, cache_dir=cache_dir)
        except Exception as e:
            raise CLIPLoadError(f"could not build {name}: {e}") from e
        preprocess = open_clip.get_model_preprocess_cfg(model)
        mean, std = tuple(preprocess.get("mean", mean)), tuple(preprocess.get("std", std))
        use_quick_gelu = bool(quick_gelu)
        fingerprint = _fingerprint(name)
    else:
        if open_clip.get_model_config(name) is None:
            raise CLIPLoadError(
                f"unknown CLIP architecture '{name}'. Known: RN50, RN101, ViT-B-16, ... "
                "(see open_clip.list_models()), or use 'hf-hub:org/repo' / 'local-dir:/path'."
            )
        checkpoint: str | None = None
        tag_cfg: dict = {}
        if pretrained is not None:
            pretrained = str(pretrained)
            packaged = PACKAGED_WEIGHTS.get((name, pretrained))
            tag_cfg = open_clip.get_pretrained_cfg(name, pretrained) or {}
            if packaged is not None:
                checkpoint = str(_verified_packaged_file(name, pretrained, packaged))
            elif tag_cfg:
                checkpoint = _download_tag(name, pretrained, tag_cfg, cache_dir)
                mean, std = tuple(tag_cfg.get("mean", mean)), tuple(tag_cfg.get("std", std))
            elif Path(pretrained).expanduser().is_file():
                checkpoint = str(Path(pretrained).expanduser())
            elif os.sep in pretrained or Path(pretrained).suffix:
                raise CLIPLoadError(f"checkpoint file not found: {pretrained}")
            else:
                tags = open_clip.list_pretrained_tags_by_model(name)
                raise CLIPLoadError(
                    f"'{pretrained}' is neither a pretrained tag of {name} (known: {tags}) nor an existing "
                    "file. Pass a tag or the path to a local checkpoint."
                )
        state, is_openai_jit = read_state_dict(checkpoint) if checkpoint else (None, False)
        if quick_gelu is None:
            reasons = {"OpenAI TorchScript weights": is_openai_jit, "a -quickgelu name": name.endswith("-quickgelu"),
                       f"the {pretrained} tag": bool(tag_cfg.get("quick_gelu"))}  # fmt: skip
            why = [r for r, on in reasons.items() if on]
            quick_gelu = bool(why)
            logger.info("%s: QuickGELU %s (%s)", name, "on" if why else "off", ", ".join(why) or "not OpenAI weights")
        else:
            logger.info("%s: QuickGELU %s (as asked)", name, "on" if quick_gelu else "off")
        use_quick_gelu = quick_gelu
        # open_clip warns "initialized randomly" before we load the weights; random initialisation is skipped
        # when every parameter is then overwritten (_load_weights is strict): RN50 builds in 0.1 s, not 0.9 s.
        with _quiet_root_logger(), skip_init() if state is not None else nullcontext():
            model = open_clip.create_model(
                name, pretrained=None, device="cpu", force_quick_gelu=use_quick_gelu, pretrained_text=False
            )
        if state is not None:
            _load_weights(model, state, checkpoint, name)
        else:
            logger.warning("%s: random weights (pretrained=None was asked for)", name)
        if precision in ("fp16", "bf16"):
            model = model.to(torch.float16 if precision == "fp16" else torch.bfloat16)
        model = model.to(device)
        if packaged is not None:
            fingerprint = _fingerprint(name, packaged.sha256)  # the same in every installation
        elif checkpoint:
            stat = Path(checkpoint).stat()
            fingerprint = _fingerprint(name, Path(checkpoint).resolve(), stat.st_size, stat.st_mtime_ns)
        else:
            fingerprint = _fingerprint(name, "random", id(model))
    model.eval()
    tokenizer = open_clip.get_tokenizer(source, cache_dir=cache_dir) if schema else open_clip.get_tokenizer(name)
    return LoadedCLIP(
        model=model,
        tokenizer=tokenizer,
        name=name,
        pretrained=None if pretrained is None else str(pretrained),
        mean=mean,
        std=std,
        quick_gelu=use_quick_gelu,
        fingerprint=fingerprint,
        inference=dict(packaged.inference) if packaged is not None else {},
        description=packaged.description if packaged is not None else "",
    )

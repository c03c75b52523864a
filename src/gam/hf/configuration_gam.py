"""``GAMHFConfig``: the Hugging Face config of a gam language model, of any registered family.

``gam_model_name`` is the library's registered name (``gam`` and its ablations, ``gam-delta``,
``transformer``, ``mamba``, ...: every name of ``gam.models.registry.MODELS``, including
families registered later). The config carries exactly the fields of that name's config class
(same names, same defaults, validated by the library's own checks) plus the usual
``PretrainedConfig`` attributes. HF's standard names are aliases of the gam ones::

    config.hidden_size             -> config.d_model
    config.num_hidden_layers       -> config.n_layers
    config.max_position_embeddings -> config.max_seq_len

``tie_embeddings`` is an alias of ``tie_word_embeddings`` too (None: the ``init`` scheme's choice);
``init`` and ``pos_embedding_std`` choose the initialisation exactly as in the library.
The ``model_type`` stays ``"gam"`` for every family (the name of the package that runs them).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

from gam.models.gam import GAMConfig
from gam.models.lm import LEGACY_INIT, SCHEME_TIES, LMConfig
from gam.models.registry import MODELS, config_class

#: The GAMConfig fields, in order, with their defaults (the paper's model).
GAM_FIELDS: dict[str, Any] = {f.name: f.default for f in fields(GAMConfig)}

#: The registered names the wrapper takes: every family of the registry (the wrapper only uses
#: the shell's protocol: embeddings, the blocks' forward / prefill / step passes, final norm).
HF_MODEL_NAMES: tuple[str, ...] = tuple(MODELS)

#: The GAM families: configs saved before ``gam_model_name`` was stored are one of these.
_GAM_NAMES: tuple[str, ...] = tuple(
    name for name in MODELS if issubclass(config_class(name), GAMConfig))


# trust_remote_code entry points: transformers imports these files from a model folder and takes
# the classes named in auto_map; they re-export the installed package's classes, so a folder
# loaded either way gives the same classes (and transformers names `gam` as the package to
# install). Every save_pretrained of the config (and so of the model: exports, Trainer's
# save_model, a re-save of a loaded model) writes them, so no folder loses its code.
_REMOTE_CODE_NOTE = ("Entry point for AutoModel*.from_pretrained(..., trust_remote_code=True), "
                     "written by gam's save_pretrained.\nNeeds the gam package: "
                     "pip install 'gam[hf]'.")
REMOTE_CODE: dict[str, str] = {
    "configuration_gam.py": f'"""{_REMOTE_CODE_NOTE}"""\n\n'
                            "from gam.hf.configuration_gam import GAMHFConfig\n\n"
                            '__all__ = ["GAMHFConfig"]\n',
    "modeling_gam.py": f'"""{_REMOTE_CODE_NOTE}"""\n\n'
                       "from gam.hf.modeling_gam import GAMForCausalLM, GAMModel\n\n"
                       '__all__ = ["GAMForCausalLM", "GAMModel"]\n',
}
AUTO_MAP: dict[str, str] = {
    "AutoConfig": "configuration_gam.GAMHFConfig",
    "AutoModel": "modeling_gam.GAMModel",
    "AutoModelForCausalLM": "modeling_gam.GAMForCausalLM",
}


def write_remote_code(folder: str | os.PathLike[str]) -> None:
    """Write the remote-code entry points (``REMOTE_CODE``) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for filename, source in REMOTE_CODE.items():
        (folder / filename).write_text(source)


@contextmanager
def without_source_copy(obj: Any) -> Iterator[None]:
    """transformers copies the source file of a class loaded as remote code (``_auto_class``
    set) into the folder it saves to: for gam that is the package's own module, which would
    replace the entry point. Switched off while saving (the entry points are written instead)."""
    cls = type(obj)
    own = "_auto_class" in cls.__dict__
    previous = cls.__dict__.get("_auto_class")
    cls._auto_class = None
    try:
        yield
    finally:
        if own:
            cls._auto_class = previous
        else:
            del cls._auto_class


def save_with_remote_code(obj: Any, save: Callable[..., Any],
                          save_directory: str | os.PathLike[str], *args: Any,
                          **kwargs: Any) -> Any:
    """``save(save_directory, *args, **kwargs)`` (a base class's ``save_pretrained``) with the entry
    points written first (so that ``push_to_hub`` uploads them) and no source copied."""
    write_remote_code(save_directory)
    with without_source_copy(obj):
        return save(save_directory, *args, **kwargs)


def _fields(name: str) -> dict[str, Any]:
    return {f.name: f.default for f in fields(config_class(name))}


def infer_model_name(values: dict[str, Any]) -> str:
    """The registered name whose fixed settings (the registry's variant flags) ``values`` has,
    for configs saved before ``gam_model_name`` was stored; of several, the one with the most
    such settings (``gam-delta-matched`` over ``gam-delta``); ``gam`` when none fits. A family
    with fields of its own (gam-delta's) is chosen only when some of them are given."""
    family_fields = set().union(*map(_fields, _GAM_NAMES)) - set(GAM_FIELDS)
    given = set(values) & family_fields
    fits = []
    for name in _GAM_NAMES:
        known = _fields(name)
        if not given <= set(known) or (not given and set(known) != set(GAM_FIELDS)):
            continue  # fields this family does not have, or a family none of whose are given
        variant = {**{k: known[k] for k in ("use_local", "use_global", "use_gate")},
                   **MODELS[name].variant}
        if all(values.get(k, known.get(k)) == v for k, v in variant.items()):
            fits.append(name)
    return max(fits, key=lambda name: len(MODELS[name].variant), default="gam")


class GAMHFConfig(PretrainedConfig):
    """Configuration of :class:`gam.hf.GAMForCausalLM` (``model_type = "gam"``).

    ``gam_model_name`` picks the family (default: ``gam``, or the GAM variant a legacy config's
    flags describe). The defaults are the family's (for ``gam`` the paper's model: vocab 10000,
    256 tokens, d 512, 6 layers, 512 memory slots, kernel 3, dropout 0.1). Any field of the
    family's config can be passed by name, and
    ``hidden_size`` / ``num_hidden_layers`` / ``max_position_embeddings`` are accepted as
    aliases. Invalid values raise ``ValueError`` (the library's checks).
    """

    model_type = "gam"
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "max_position_embeddings": "max_seq_len",
        # one attribute, not two that can disagree: the library's name reads and writes HF's
        "tie_embeddings": "tie_word_embeddings",
    }
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        gam_model_name: str | None = None,
        use_cache: bool = True,
        tie_word_embeddings: bool | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        **kwargs: Any,
    ) -> None:
        # Every field of the family's config (vocab_size, max_seq_len, d_model, n_layers, ...,
        # GAM's num_memory_slots, the Transformer's n_heads, and any the library adds later) is
        # read from kwargs by name, with the library's default.
        if "transformers_version" in kwargs and "init" not in kwargs:
            # a config.json saved before the init setting existed: the model it describes was
            # built with the official init, tied (the library's LEGACY_INIT)
            kwargs = {**LEGACY_INIT, **kwargs}
        tie_given = "tie_embeddings" in kwargs
        if gam_model_name is None:
            gam_model_name = infer_model_name(kwargs)
        if gam_model_name not in HF_MODEL_NAMES:
            raise ValueError(f"gam_model_name must be one of {HF_MODEL_NAMES} (the registered "
                             f"model names), got {gam_model_name!r}")
        self.gam_model_name = gam_model_name
        for name, default in _fields(gam_model_name).items():
            setattr(self, name, kwargs.pop(name, default))
        if tie_word_embeddings is not None:
            if tie_given and self.tie_embeddings is not None \
                    and tie_word_embeddings != self.tie_embeddings:
                raise ValueError(f"tie_word_embeddings={tie_word_embeddings} contradicts "
                                 f"tie_embeddings={self.tie_embeddings}; give one of them")
            self.tie_embeddings = tie_word_embeddings
        if self.tie_embeddings is None:  # the init scheme's choice, as the library resolves it
            self.tie_embeddings = SCHEME_TIES.get(self.init, True)
        self.use_cache = use_cache
        # Aliases (hidden_size=...) arrive in kwargs; the base class sets them through
        # attribute_map, after the assignments above, so they take precedence.
        super().__init__(tie_word_embeddings=bool(self.tie_embeddings), bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)
        self.to_gam_config()  # validate with the library's checks

    def save_pretrained(self, save_directory: str | os.PathLike[str], **kwargs: Any) -> Any:
        """``PretrainedConfig.save_pretrained``, plus the remote-code entry points and their
        ``auto_map``: the folder loads with ``trust_remote_code=True`` without ``gam.hf``."""
        self.auto_map = dict(AUTO_MAP)
        return save_with_remote_code(self, super().save_pretrained, save_directory, **kwargs)

    # The base class is a dataclass in transformers 5, whose generated __eq__ would only compare
    # the base fields; compare everything, as PretrainedConfig does.
    def __eq__(self, other: object) -> bool:
        return isinstance(other, PretrainedConfig) and self.__dict__ == other.__dict__

    __hash__ = None  # type: ignore[assignment]

    def to_gam_config(self) -> LMConfig:
        """The library config (the family's config class) with these values."""
        cls = config_class(self.gam_model_name)
        return cls(**{name: getattr(self, name) for name in _fields(self.gam_model_name)})

    @classmethod
    def from_gam_config(cls, config: LMConfig, model_name: str | None = None,
                        **kwargs: Any) -> GAMHFConfig:
        """Build the HF config of a library config (``model_name``: its registered name,
        inferred from the variant flags when omitted; kwargs: token ids etc.)."""
        return cls(gam_model_name=model_name, **config.to_dict(), **kwargs)

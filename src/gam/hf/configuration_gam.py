"""``GAMHFConfig``: the Hugging Face config of a GAM language model.

``gam_model_name`` is the library's registered name (``gam``, its Table 3 ablations, ``gam-delta``
and its variants: every registry family whose config is a ``GAMConfig``). The config carries
exactly the fields of that name's config class (same names, same defaults, validated by the
library's own checks) plus the usual ``PretrainedConfig`` attributes. HF's standard names are
aliases of the GAM ones::

    config.hidden_size             -> config.d_model
    config.num_hidden_layers       -> config.n_layers
    config.max_position_embeddings -> config.max_seq_len

``tie_embeddings`` is an alias of ``tie_word_embeddings`` too (None: the ``init`` scheme's choice);
``init`` and ``pos_embedding_std`` choose the initialisation exactly as in the library.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from transformers import PretrainedConfig

from gam.models.gam import GAMConfig
from gam.models.lm import LEGACY_INIT, SCHEME_TIES
from gam.models.registry import MODELS, config_class

#: The GAMConfig fields, in order, with their defaults (the paper's model).
GAM_FIELDS: dict[str, Any] = {f.name: f.default for f in fields(GAMConfig)}

#: The registered names the wrapper takes: every family whose config is a GAMConfig (their
#: blocks share GAMBlock's prefill / extend(pad_mask) / step protocol).
HF_MODEL_NAMES: tuple[str, ...] = tuple(
    name for name in MODELS if issubclass(config_class(name), GAMConfig))


def _fields(name: str) -> dict[str, Any]:
    return {f.name: f.default for f in fields(config_class(name))}


def infer_model_name(values: dict[str, Any]) -> str:
    """The registered name whose fixed settings (the registry's variant flags) ``values`` has,
    for configs saved before ``gam_model_name`` was stored; of several, the one with the most
    such settings (``gam-delta-matched`` over ``gam-delta``); ``gam`` when none fits. A family
    with fields of its own (gam-delta's) is chosen only when some of them are given."""
    family_fields = set().union(*map(_fields, HF_MODEL_NAMES)) - set(GAM_FIELDS)
    given = set(values) & family_fields
    fits = []
    for name in HF_MODEL_NAMES:
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

    The defaults are the paper's model (vocab 10000, 256 tokens, d 512, 6 layers, 512 memory
    slots, kernel 3, dropout 0.1). Any ``GAMConfig`` field can be passed by name, and
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
        # Every GAMConfig field (vocab_size, max_seq_len, d_model, n_layers, ffn_mult, dropout,
        # pos_embedding, num_memory_slots, conv_kernel_size, use_local, use_global, use_gate, and
        # any the library adds later) is read from kwargs by name, with the library's default.
        if "transformers_version" in kwargs and "init" not in kwargs:
            # a config.json saved before the init setting existed: the model it describes was
            # built with the official init, tied (the library's LEGACY_INIT)
            kwargs = {**LEGACY_INIT, **kwargs}
        tie_given = "tie_embeddings" in kwargs
        if gam_model_name is None:
            gam_model_name = infer_model_name(kwargs)
        if gam_model_name not in HF_MODEL_NAMES:
            raise ValueError(f"gam_model_name must be one of {HF_MODEL_NAMES} (the GAM "
                             f"families), got {gam_model_name!r}")
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

    # The base class is a dataclass in transformers 5, whose generated __eq__ would only compare
    # the base fields; compare everything, as PretrainedConfig does.
    def __eq__(self, other: object) -> bool:
        return isinstance(other, PretrainedConfig) and self.__dict__ == other.__dict__

    __hash__ = None  # type: ignore[assignment]

    def to_gam_config(self) -> GAMConfig:
        """The library config (``GAMConfig``, or the family's subclass) with these values."""
        cls = config_class(self.gam_model_name)
        return cls(**{name: getattr(self, name) for name in _fields(self.gam_model_name)})

    @classmethod
    def from_gam_config(cls, config: GAMConfig, model_name: str | None = None,
                        **kwargs: Any) -> GAMHFConfig:
        """Build the HF config of a library config (``model_name``: its registered name,
        inferred from the variant flags when omitted; kwargs: token ids etc.)."""
        return cls(gam_model_name=model_name, **config.to_dict(), **kwargs)

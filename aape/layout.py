"""Where every stage reads and writes: one place, so the CLI, Prefect and DVC agree.

    <output_dir>/
      data/        classes.json, split_{train,val,test}.parquet, fewshot/seed{S}/{train,val}.parquet
      prompts/     descriptions.parquet, summary.json
      features/    seed{S}/{train,val,test}.safetensors, text.safetensors, index.json
      aggregator/  seed{S}/aggregator.safetensors, aggregator.json, summaries.safetensors, history.json
      generator/   seed{S}/generator.safetensors, generator.json, history.json
      baselines/   <method>/seed{S}/model.safetensors, model.json, history.json; trained.json
      eval/        metrics.json, per_class.parquet, results.parquet, report.md, plots/
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aape.config import Params


@dataclass(frozen=True)
class Layout:
    root: Path
    cache: Path

    @classmethod
    def from_params(cls, params: Params) -> "Layout":
        return cls(Path(params.run.output_dir), Path(params.run.cache_dir))

    # stage directories -------------------------------------------------------------------------
    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def prompts(self) -> Path:
        return self.root / "prompts"

    @property
    def features(self) -> Path:
        return self.root / "features"

    @property
    def aggregator(self) -> Path:
        return self.root / "aggregator"

    @property
    def generator(self) -> Path:
        return self.root / "generator"

    @property
    def baselines(self) -> Path:
        return self.root / "baselines"

    def baseline_dir(self, method: str, seed: int) -> Path:
        return self.seed_dir(self.baselines / method, seed)

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    # files -------------------------------------------------------------------------------------
    @property
    def classes_file(self) -> Path:
        return self.data / "classes.json"

    def split_manifest(self, split: str) -> Path:
        return self.data / f"split_{split}.parquet"

    def fewshot_manifest(self, seed: int, split: str) -> Path:
        return self.data / "fewshot" / f"seed{seed}" / f"{split}.parquet"

    @property
    def descriptions(self) -> Path:
        return self.prompts / "descriptions.parquet"

    def seed_dir(self, stage_dir: Path, seed: int) -> Path:
        return stage_dir / f"seed{seed}"

    @property
    def metrics(self) -> Path:
        return self.eval / "metrics.json"

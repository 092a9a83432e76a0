"""PMG: Parametric Memory Gate sequence models for the Hugging Face ecosystem.

Importing the package registers the models with transformers' Auto classes, and marks them for
`save_pretrained` to write `auto_map` and copy the modeling files, so saved checkpoints also load with
`trust_remote_code=True` where `pmg` is not installed.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTimeSeriesPrediction,
)

from .configuration_pmg import PMGConfig
from .modeling_pmg import (
    PMGForCausalLM,
    PMGForSequenceClassification,
    PMGLayer,
    PMGModel,
    PMGPreTrainedModel,
    PMGState,
)
from .modeling_pmg_time_series import (
    PMGForTimeSeriesClassification,
    PMGForTimeSeriesForecasting,
    PMGTimeSeriesPreTrainedModel,
)
from .optimization import optimizer_param_groups
from .scan_pmg import linear_recurrence, pmg_scan

AutoConfig.register("pmg", PMGConfig, exist_ok=True)
for auto_class, model_class in (
    (AutoModel, PMGModel),
    (AutoModelForCausalLM, PMGForCausalLM),
    (AutoModelForSequenceClassification, PMGForSequenceClassification),
    (AutoModelForTimeSeriesPrediction, PMGForTimeSeriesForecasting),
):
    auto_class.register(PMGConfig, model_class, exist_ok=True)
    model_class.register_for_auto_class(auto_class.__name__)
# transformers has no Auto class for time-series classification: checkpoints name AutoModelForSequenceClassification
# in auto_map, for trust_remote_code loading (where pmg is installed, load with PMGForTimeSeriesClassification)
PMGForTimeSeriesClassification.register_for_auto_class(AutoModelForSequenceClassification.__name__)
PMGConfig.register_for_auto_class()

__version__ = "0.1.0"

__all__ = [
    "PMGConfig",
    "PMGForCausalLM",
    "PMGForSequenceClassification",
    "PMGForTimeSeriesClassification",
    "PMGForTimeSeriesForecasting",
    "PMGLayer",
    "PMGModel",
    "PMGPreTrainedModel",
    "PMGState",
    "PMGTimeSeriesPreTrainedModel",
    "linear_recurrence",
    "optimizer_param_groups",
    "pmg_scan",
]

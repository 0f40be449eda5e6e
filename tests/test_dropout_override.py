"""`--dropout` on loaded weights reaches every dropout of the model and the config written beside it."""

from __future__ import annotations

from model_factory import seeded_model, small_test_config
from torch import nn

from minigpt.config import TrainConfig
from minigpt.model import Attention
from minigpt.train.loop import StartingWeights, build_model
from minigpt.weights import save_consolidated


def dropout_rates(model: nn.Module) -> set[float]:
    """Every dropout probability the model applies: nn.Dropout modules and attention's own rate."""
    rates = {module.p for module in model.modules() if isinstance(module, nn.Dropout)}
    return rates | {module.dropout for module in model.modules() if isinstance(module, Attention)}


def test_dropout_flag_on_loaded_weights_sets_every_dropout_and_the_model_config(tmp_path, data_tokenizer):
    weights = save_consolidated(tmp_path / "final", seeded_model(small_test_config(data_tokenizer.vocab_size))
                                .state_dict(), small_test_config(data_tokenizer.vocab_size), data_tokenizer.directory)
    cfg = TrainConfig.of(mode="sft", dropout=0.2, out=str(tmp_path / "run"))
    model = build_model(cfg, data_tokenizer, StartingWeights(source=str(weights), model_dir=weights))
    assert dropout_rates(model) == {0.2}
    assert model.config.dropout == 0.2  # what the snapshot and final/config.json record


def test_set_dropout_changes_attention_residual_and_config():
    model = seeded_model(small_test_config(512))
    model.set_dropout(0.3)
    assert dropout_rates(model) == {0.3}
    assert model.config.dropout == 0.3

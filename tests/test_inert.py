"""Every replacement of a fairseq function is inert for what is not ours: driven with a
``MagicMock`` trainer and configuration (as fairseq's own unit tests build them) or with a dense
``transformer_lm``, it calls fairseq's function once, with exactly the arguments it was given,
and returns what fairseq's returned, touching no process group (none exists here; the stand-in
trainer says it has 2 workers, so a collective would raise)."""

from argparse import Namespace
from types import SimpleNamespace
from unittest.mock import MagicMock, call

import pytest
import torch
from fairseq import options
from fairseq.data import Dictionary
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.models.transformer_lm import TransformerLanguageModel

from fairseq_base.fairseq_patches import (checkpoint_files, ddp, eval_lm, launch, optimizer, routing_churn, saves,
                                          which_models)

TINY = ["--arch", "transformer_lm", "--decoder-layers", "1", "--decoder-embed-dim", "8", "--decoder-ffn-embed-dim", "16",
        "--decoder-attention-heads", "2", "--task", "language_modeling", "--optimizer", "adam", "--lr", "0.001",
        "--max-tokens", "64", "--cpu"]


@pytest.fixture(scope="module")
def dense_objects(tmp_path_factory):
    """A dense transformer_lm as fairseq builds it: (cfg, model, stand-in trainer, stand-in optimizer)."""
    tmp_path = tmp_path_factory.mktemp("dense")
    dictionary = Dictionary()
    for symbol in "abc":
        dictionary.add_symbol(symbol)
    dictionary.save(str(tmp_path / "dict.txt"))
    args = options.parse_args_and_arch(options.get_training_parser(), [str(tmp_path), *TINY])
    task = SimpleNamespace(source_dictionary=dictionary, target_dictionary=dictionary)
    cfg = convert_namespace_to_omegaconf(args)
    model = TransformerLanguageModel.build_model(cfg.model, task)
    trainer = SimpleNamespace(cfg=cfg, get_model=lambda: model, data_parallel_world_size=2, data_parallel_rank=1,
                              data_parallel_process_group=None, checkpoint_suffix="", get_num_updates=lambda: 3)
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    adam = SimpleNamespace(params=list(model.parameters()))
    eval_cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(
        options.get_eval_lm_parser(), [str(tmp_path), "--path", str(tmp_path / "none.pt"), "--cpu"]))
    return SimpleNamespace(cfg=cfg, eval_cfg=eval_cfg, model=model, trainer=trainer, optimizer=adam,
                           dictionary=dictionary)


# (module, the name under which it keeps fairseq's function, our replacement, the arguments fairseq's callers
# pass: from the MagicMock objects m, and from the dense objects d)
REPLACEMENTS = [
    (launch, "FAIRSEQ_INFER_INIT_METHOD", launch.infer_init_method, lambda m: (m.cfg.distributed_training,),
     lambda d: (d.cfg.distributed_training,)),
    (launch, "FAIRSEQ_CALL_MAIN", launch.call_main, lambda m: (m.cfg, m.main), lambda d: (d.cfg, print)),
    (ddp, "FAIRSEQ_WRAP_MODEL", ddp.wrap_model, lambda m: (m.args, m.model, m.group, m.device),
     lambda d: (d.cfg.distributed_training, d.model, None, torch.device("cpu"))),
    (checkpoint_files, "FAIRSEQ_TRAINER_INIT", checkpoint_files.trainer_init,
     lambda m: (m.trainer, m.cfg, m.task, m.model, m.criterion), lambda d: (d.trainer, d.cfg, None, d.model, None)),
    (checkpoint_files, "FAIRSEQ_TRAINER_STATE_DICT", checkpoint_files.trainer_state_dict, lambda m: (m.trainer,),
     lambda d: (d.trainer,)),
    (checkpoint_files, "FAIRSEQ_LOAD_CHECKPOINT_TO_CPU", checkpoint_files.load_checkpoint_to_cpu,
     lambda m: ("checkpoint_last.pt",), lambda d: ("checkpoint_last.pt",)),
    (checkpoint_files, "FAIRSEQ_LOAD_MODEL_ENSEMBLE_AND_TASK", checkpoint_files.load_model_ensemble_and_task,
     lambda m: (m.filenames,), lambda d: (["no-such-model.pt"],)),
    (checkpoint_files, "FAIRSEQ_TRAINER_LOAD_CHECKPOINT", checkpoint_files.trainer_load_checkpoint,
     lambda m: (m.trainer, m.filename), lambda d: (d.trainer, "checkpoint_last.pt")),
    (saves, "FAIRSEQ_SAVE_CHECKPOINT", saves.save_checkpoint, lambda m: (m.cfg.checkpoint, m.trainer, m.itr, m.loss),
     lambda d: (d.cfg.checkpoint, d.trainer, None, 1.0)),
    (saves, "FAIRSEQ_TRAINER_SAVE_CHECKPOINT", saves.trainer_save_checkpoint,
     lambda m: (m.trainer, "checkpoints/crash.pt", m.extra), lambda d: (d.trainer, "checkpoints/crash.pt", {})),
    (saves, "FAIRSEQ_LOAD_CHECKPOINT", saves.load_checkpoint, lambda m: (m.cfg.checkpoint, m.trainer),
     lambda d: (d.cfg.checkpoint, d.trainer)),
    (eval_lm, "FAIRSEQ_MAIN", eval_lm.main, lambda m: (m.cfg,), lambda d: (d.eval_cfg,)),
    (eval_lm, "FAIRSEQ_EVAL_LM", eval_lm.eval_lm, lambda m: (m.models, m.dictionary, m.batches),
     lambda d: ([d.model], d.dictionary, iter([]))),
    (optimizer, "FAIRSEQ_BUILD_FP32_PARAMS", optimizer.build_fp32_params, lambda m: (m.cls, m.args, m.params, True),
     lambda d: (None, d.cfg.optimization, list(d.model.parameters()), True)),
    (optimizer, "FAIRSEQ_CLIP_GRAD_NORM", optimizer.clip_grad_norm, lambda m: (m.optimizer, 0.5),
     lambda d: (d.optimizer, 0.5)),
    (optimizer, "FAIRSEQ_ALL_REDUCE_GRADS", optimizer.all_reduce_grads, lambda m: (m.optimizer, m.model),
     lambda d: (d.optimizer, d.model)),
    (routing_churn, "FAIRSEQ_BEGIN_VALID_EPOCH", routing_churn.begin_valid_epoch, lambda m: (m.trainer, 1),
     lambda d: (d.trainer, 1)),
]


@pytest.mark.parametrize("objects", ["MagicMock", "dense transformer_lm"])
@pytest.mark.parametrize("module,fairseqs,ours,mocked,dense", REPLACEMENTS,
                         ids=[f"{module.__name__.split('.')[-1]}.{ours.__name__}" for module, _, ours, _, _ in REPLACEMENTS])
def test_a_replacement_calls_fairseqs_function_unchanged_for_what_is_not_ours(monkeypatch, dense_objects, objects,
                                                                               module, fairseqs, ours, mocked, dense):
    fairseq_function = MagicMock(return_value={"returned by": "fairseq"})  # a state dict, for the loaders
    monkeypatch.setattr(module, fairseqs, fairseq_function)
    args = mocked(MagicMock()) if objects == "MagicMock" else dense(dense_objects)
    assert ours(*args) is fairseq_function.return_value
    assert fairseq_function.call_args_list == [call(*args)]


def test_a_dense_models_perplexity_over_no_tokens_is_one_line(monkeypatch, dense_objects):
    """fairseq-eval-lm of a dense model that skipped every block (fairseq returns a loss of 0 for
    no tokens, and prints "Perplexity: 1.00"): one line naming --tokens-per-sample, as for BASE."""
    from fairseq_base.errors import BaseLayerConfigError
    monkeypatch.setattr(eval_lm, "FAIRSEQ_EVAL_LM", MagicMock(return_value={"loss": 0, "perplexity": 1.0}))
    with pytest.raises(BaseLayerConfigError, match="scored 0 tokens .* pass --tokens-per-sample"):
        eval_lm.eval_lm([dense_objects.model], dense_objects.dictionary, iter([]))


@pytest.mark.parametrize("objects", ["MagicMock", "dense transformer_lm"])
def test_which_files_a_worker_saves_is_fairseqs_for_what_is_not_ours(monkeypatch, dense_objects, objects):
    """``Trainer.should_save_checkpoint_on_current_rank`` is a property: fairseq's getter, unchanged."""
    getter = MagicMock(return_value=object())
    monkeypatch.setattr(checkpoint_files, "FAIRSEQ_SHOULD_SAVE", property(getter))
    trainer = MagicMock() if objects == "MagicMock" else dense_objects.trainer
    assert checkpoint_files.should_save_checkpoint_on_current_rank(trainer) is getter.return_value
    assert getter.call_args_list == [call(trainer)]


def test_a_trainer_built_from_mocks_keeps_its_configuration(monkeypatch):
    """fairseq's unit tests build Trainers from MagicMock configurations: nothing of ours is written into them."""
    monkeypatch.setattr(checkpoint_files, "FAIRSEQ_TRAINER_INIT", MagicMock())
    cfg = MagicMock()
    checkpoint_files.trainer_init(MagicMock(), cfg, MagicMock(), MagicMock(), MagicMock())
    assert isinstance(cfg.checkpoint.checkpoint_suffix, MagicMock) and isinstance(cfg.model.base_experts, MagicMock)


@pytest.mark.parametrize("value,asks", [(1, True), (0, False), (None, False), (True, False), ("2", False),
                                        (MagicMock(), False), (2.0, False)])
def test_expert_options_are_read_only_from_whole_numbers(value, asks):
    assert which_models.has_expert_options(Namespace(base_layers=value)) is asks
    assert which_models.has_expert_options(SimpleNamespace(base_moe_freq=value)) is asks
    assert which_models.is_expert_model(Namespace(base_layers=value, base_expert_parallel_size=0)) is asks
    assert not which_models.is_expert_model(Namespace(base_layers=value, base_expert_parallel_size=MagicMock()))
    assert not which_models.has_experts(MagicMock())

"""The one schedule (attention/core/schedule.py): the widget vocabulary in fractions of the steps reproduces the papers'
timestep / step parameters at their defaults on ComfyUI's own schedules, and the run-boundary rule."""
import pytest
import torch

from inversion_chain import compat
from inversion_chain.artifacts import InversionChainError, naming
from inversion_chain.attention.core.controller import CallContext, Controller
from inversion_chain.attention.editors.rival import RivalAttentionEditor
from inversion_chain.attention.core.schedule import (RunTracker, Schedule, StepInfo, percent_after_timestep,
                                                percent_of_step, steps_within)

pytestmark = pytest.mark.fast


@pytest.fixture(scope="module")
def ddim50(small_model):
    """SD's DDIM schedule of 50 steps, and the model timestep of every sigma, from ComfyUI itself."""
    model = small_model[0]
    sigmas = compat.calculate_sigmas(model, "ddim_uniform", 50)
    sampling = compat.model_sampling(model)
    timesteps = [float(sampling.timestep(s.view(1))) for s in sigmas[:-1]]
    return model, sigmas, timesteps


def regime_of_each_step(model, sigmas, editor):
    """Drive the editor through the Controller, as sampling does: 'replace' or 'concat' per step."""
    controller = Controller([], compat.model_sampling(model), [editor])
    out = []
    rows, n, c = 2, 4, 8
    for i in range(len(sigmas) - 1):
        step = controller.step_of({"sigmas": sigmas[i:i + 1].clone()})
        ctx = CallContext(kind="self", layer=None, step=step, cond_or_uncond=[0], rows_per_chunk=rows, grid=(2, 2),
                          heads=1, extra_options={})
        q = k = v = torch.zeros(rows, n, c)
        out.append("replace" if editor.edit_qkv(q, k, v, ctx)[1].shape[1] == n else "concat")
    return out


def test_rival_fractions_reproduce_t_align_and_t_early_600_on_50_ddim_uniform_steps(ddim50):
    model, sigmas, timesteps = ddim50
    assert percent_after_timestep(timesteps, 600) == 0.4
    editor = RivalAttentionEditor(0.4, Schedule(sigmas, "ddim_uniform"))
    regimes = regime_of_each_step(model, sigmas, editor)
    # the paper: reference K/V replace the own for t > t_align, concatenation below
    assert regimes == ["replace" if t > 600 else "concat" for t in timesteps]
    assert regimes.count("replace") == 20
    # normalisation (t > t_early) uses the same rule on the same schedule
    schedule = Schedule(sigmas, "ddim_uniform")
    assert [schedule.fraction(i) < 0.4 for i in range(50)] == [t > 600 for t in timesteps]


def test_kv_inject_start_percent_reproduces_masactrl_start_step_4_of_50():
    assert percent_of_step(4, 50) == 0.08
    assert steps_within(50, 0.08) == list(range(4, 50))
    assert steps_within(50, 1.0) == [] and steps_within(50, 0.0) == list(range(50))


def test_step_is_located_once_per_unet_call_and_off_schedule_sigmas_are_explained(ddim50):
    model, sigmas, _ = ddim50
    with naming("Some Node"):   # made inside a node's function: its error, raised while a sampler runs, names it
        schedule = Schedule(sigmas, "ddim_uniform")
    editor = RivalAttentionEditor(0.4, schedule)
    controller = Controller([], compat.model_sampling(model), [editor])
    call = {"sigmas": sigmas[7:8].clone()}
    first = controller.step_of(call)
    assert controller.step_of(call) is first and (first.index, first.total) == (7, 50)
    off = controller.step_of({"sigmas": torch.tensor([float(sigmas[7]) * 0.9])})
    assert off.index is None
    with pytest.raises(InversionChainError, match="Some Node: .* Sample with 50 steps and scheduler 'ddim_uniform'"):
        schedule.step(off)
    assert StepInfo(index=3, total=10, sigma=1.0, timestep=0.0).within(0.3, 0.4)
    assert not StepInfo(index=4, total=10, sigma=1.0, timestep=0.0).within(0.3, 0.4)


def test_a_new_run_starts_when_sigma_rises_or_another_model_clone_samples():
    runs, a, b = RunTracker(), object(), object()
    assert [runs.new_run(s, a) for s in (10.0, 5.0, 1.0, 1.0)] == [False, False, False, False]
    assert runs.new_run(10.0, a) is True           # sigma went back up
    assert runs.new_run(5.0, b) is True            # the same editor, another MODEL clone's Controller
    assert runs.new_run(1.0, b) is False

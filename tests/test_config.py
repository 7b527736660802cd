"""Self-description from the constructor's arguments (pyro_ddpm.config.Configurable) and the registry's
checks of stored configs: round trips of subclasses with arguments of their own, refusals in one line,
the objects a class is built around never stored, and configs in the stored format build.
"""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import pytest
import torch

from pyro_ddpm.config import Configurable
from pyro_ddpm.guides import ForwardProcess, LearnedForwardProcess, LinearForwardProcess
from pyro_ddpm.likelihoods import DiscretizedGaussianLikelihood, GaussianLikelihood
from pyro_ddpm.models import LearnedVarianceReverseProcess, ReverseProcess
from pyro_ddpm.nets import MLP, UNet
from pyro_ddpm.registry import GUIDES, LIKELIHOODS, MODELS, NETWORKS, TIMESTEPS
from pyro_ddpm.schedule import Schedule


class TemperedReverseProcess(ReverseProcess):
    """sigma_t^2 times a temperature: one constructor argument more, the others passed on by keyword."""

    def __init__(self, eps, schedule, temperature: float = 1.0, **options):
        super().__init__(eps, schedule, **options)
        self.temperature = float(temperature)

    def scale(self, x_t, t, out):
        return super().scale(x_t, t, out) * math.sqrt(self.temperature)


class GeometricForwardProcess(ForwardProcess):
    """beta_t = beta_1 ratio^(t - 1): a constructor of its own that hands its base a schedule object."""

    def __init__(self, T: int, beta_1: float, ratio: float, event_dim: int | None = None):
        super().__init__(Schedule(beta_1 * ratio ** np.arange(T)), event_dim=event_dim)


class WidenedLikelihood(DiscretizedGaussianLikelihood):
    """The decoder at a widened scale; the argument is kept under another name than its own."""

    def __init__(self, levels: int, widen: float = 1.0):
        super().__init__(levels)
        self.factor = float(widen)

    def __call__(self, loc, scale):
        return super().__call__(loc, scale * self.factor)


def linear_betas(T, lo, hi):
    return [lo + (hi - lo) * i / (T - 1) for i in range(T)]


def one_line_error(fn) -> str:
    with pytest.raises(ValueError) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_a_model_with_an_extra_argument_round_trips_through_describe_and_build():
    schedule = Schedule.linear(6, 0.01, 0.2)
    model = TemperedReverseProcess(MLP(dim=2), schedule, temperature=0.25, variance="large", shape=(2,))
    stored = MODELS.describe(model)
    assert stored == {
        "class": f"{__name__}:TemperedReverseProcess",
        "config": {"temperature": 0.25, "variance": "large", "shape": [2]},
    }
    net = MLP(dim=2)
    rebuilt = MODELS.build(stored, trust_code=True, eps=net, schedule=schedule, likelihood=GaussianLikelihood())
    assert type(rebuilt) is TemperedReverseProcess and MODELS.describe(rebuilt) == stored
    x, t = torch.zeros(5, 2, dtype=torch.float64), torch.arange(2, 7)
    net.double()
    _, scale = rebuilt.transition(x, t)
    # the large variance: sigma_t^2 = beta_t for t >= 2 (Ho et al. 2020, section 3.2), here times 0.25
    expected = torch.tensor([math.sqrt(0.25 * b) for b in linear_betas(6, 0.01, 0.2)[1:]], dtype=torch.float64)
    torch.testing.assert_close(scale[:, 0], expected, rtol=1e-12, atol=0)


def test_a_subclass_with_a_constructor_of_its_own_is_described_by_its_own_arguments():
    guide = GeometricForwardProcess(5, 0.01, 1.5, event_dim=1)
    stored = GUIDES.describe(guide)
    # not the betas of ForwardProcess's own description: that override belongs to ForwardProcess's constructor
    assert stored["config"] == {"T": 5, "beta_1": 0.01, "ratio": 1.5, "event_dim": 1}
    rebuilt = GUIDES.build(stored, trust_code=True)
    expected = [0.01 * 1.5**i for i in range(5)]
    np.testing.assert_allclose(rebuilt.schedule.betas.numpy(), expected, rtol=1e-15)
    assert GUIDES.describe(rebuilt) == stored

    decoder = WidenedLikelihood(17, widen=2.0)
    stored = LIKELIHOODS.describe(decoder)
    assert stored["config"] == {"levels": 17, "widen": 2.0}  # not read back from attributes (it keeps .factor)
    again = LIKELIHOODS.build(stored, trust_code=True)
    assert again.factor == 2.0 and repr(again) == "WidenedLikelihood(levels=17, widen=2.0)"


@pytest.mark.parametrize(
    "registry, entry, objects, message",
    [
        (
            MODELS,
            {"class": "ReverseProcess", "config": {"variance": "large", "shape": [2], "temperature": 2.0}},
            "model",
            "unknown config keys ['temperature']; ReverseProcess accepts ['clip_denoised', 'shape', 'variance']",
        ),
        (
            GUIDES,
            {"class": "LinearForwardProcess", "config": {"betas": [0.1, 0.2], "event_dim": 1}},
            {},
            "unknown config keys ['betas']; LinearForwardProcess accepts ['T', 'beta_1', 'beta_T', 'event_dim']",
        ),
        (
            NETWORKS,
            {"class": "mlp", "config": {"dim": 2, "width": 3}},
            {},
            "unknown config keys ['width']; MLP accepts ['depth', 'dim', 'hidden', 'out_channels', 'temb_dim']",
        ),
        (
            TIMESTEPS,
            {"class": "importance", "config": {"T": 5, "warmup": 3}},
            {},
            "unknown config keys ['warmup']; LossAwareSampler accepts ['T', 'history', 'uniform_fraction']",
        ),
    ],
)
def test_a_config_with_an_unknown_key_is_refused_in_one_line(registry, entry, objects, message):
    if objects == "model":
        objects = dict(eps=MLP(dim=2), schedule=Schedule.linear(4, 0.01, 0.2), likelihood=GaussianLikelihood())
    assert message in one_line_error(lambda: registry.build(entry, **objects))


def test_the_objects_a_model_is_built_around_are_not_stored():
    schedule = Schedule.linear(4, 0.01, 0.2)
    model = ReverseProcess(MLP(dim=2), schedule, "small", GaussianLikelihood(), shape=[2], clip_denoised=True)
    assert model.config() == {"variance": "small", "shape": [2]}  # no network, schedule, decoder, nor clipping
    assert model.with_clipping().config() == model.config()
    # a stored config naming one of them is refused, whether or not the caller passes it
    for key in ("eps", "likelihood"):
        entry = {"class": "ReverseProcess", "config": {"variance": "large", "shape": [2], key: "x"}}
        message = one_line_error(lambda entry=entry: MODELS.build(entry, eps=MLP(dim=2), schedule=schedule))
        assert message.endswith(f"config keys ['{key}'] are objects the caller provides, not stored data")
    # clipping is chosen where the model is used: not stored, yet a stored config may set it
    entry = {"class": "ReverseProcess", "config": {"variance": "large", "shape": [2], "clip_denoised": True}}
    assert MODELS.build(entry, eps=MLP(dim=2), schedule=schedule, likelihood=GaussianLikelihood()).clip_denoised


def test_resolved_defaults_are_recorded():
    net = MLP(dim=2)
    assert net.config() == {"dim": 2, "hidden": 128, "depth": 3, "temb_dim": 64, "out_channels": 2}
    model = ReverseProcess(net, Schedule.linear(4, 0.01, 0.2))
    assert model.config() == {"variance": "large", "shape": [2]}  # the first variance rule, the network's shape
    model.config()["shape"].append(3)  # a config is the caller's to change: the record is not
    assert model.config() == {"variance": "large", "shape": [2]}
    learned = LearnedVarianceReverseProcess(MLP(dim=2, out_channels=4), Schedule.linear(4, 0.01, 0.2))
    assert learned.config() == {"variance": "learned", "shape": [2]}
    unet = UNet(4, in_channels=1, ch=4, ch_mult=(1,), attn_resolutions=(), groups=4)
    assert unet.config() == {
        "resolution": 4,
        "in_channels": 1,
        "ch": 4,
        "ch_mult": [1],
        "num_res_blocks": 2,
        "attn_resolutions": [],
        "dropout": 0.1,
        "groups": 4,
        "out_channels": 1,
    }


def test_copies_keep_their_description():
    model = ReverseProcess(MLP(dim=2), Schedule.linear(4, 0.01, 0.2), "small", GaussianLikelihood())
    for again in (copy.copy(model), copy.deepcopy(model), pickle.loads(pickle.dumps(model)), model.with_clipping()):
        assert MODELS.describe(again) == MODELS.describe(model)
    decoder = pickle.loads(pickle.dumps(DiscretizedGaussianLikelihood(5)))
    assert LIKELIHOODS.describe(decoder) == {"class": "discretized_gaussian", "config": {"levels": 5}}


def test_an_argument_without_a_plain_form_is_named():
    class Scaled(ForwardProcess):
        def __init__(self, schedule, event_dim=None, gain: float = 1.0):
            super().__init__(schedule, event_dim)
            self.gain = gain

    message = one_line_error(lambda: Scaled(Schedule.linear(4, 0.01, 0.2), gain=2.0).config())
    assert message.startswith("Scaled.config(): its constructor argument 'schedule' is a Schedule, not plain data")

    class Positional(Configurable):
        def __init__(self, *sizes):
            self.sizes = sizes

    assert "took 2 argument(s) through *args" in one_line_error(lambda: Positional(1, 2).config())
    assert Positional().config() == {}


def test_arrays_and_tensors_are_stored_as_lists():
    class Weights(Configurable):
        def __init__(self, w, scale=np.float64(2.0), **extra):
            self.w = w

    config = Weights(torch.tensor([0.5, 0.25]), shape=(3, 4), table=np.arange(2)).config()
    assert config == {"w": [0.5, 0.25], "scale": 2.0, "shape": [3, 4], "table": [0, 1]}
    assert type(config["scale"]) is float


# Configs as checkpoints of the current format store them (FORMAT 2), one per class kind.
STORED = {
    "network": {
        "class": "unet",
        "config": {
            "resolution": 8,
            "in_channels": 1,
            "ch": 8,
            "ch_mult": [1, 2],
            "num_res_blocks": 1,
            "attn_resolutions": [4],
            "dropout": 0.1,
            "groups": 32,
            "out_channels": 1,
        },
    },
    "guide": {"class": "ForwardProcess", "config": {"betas": [0.1, 0.2, 0.3, 0.4], "event_dim": 3}},
    "learned": {
        "class": "LearnedForwardProcess",
        "config": {"T": 50, "hidden": 16, "gamma_min": -13.3, "gamma_max": 5.0, "seed": 0, "event_dim": 3},
    },
    "masked": {
        "class": "MaskedForwardProcess",
        "config": {"T": 50, "levels": 17, "schedule": "cosine", "event_dim": 3},
    },
    "likelihood": {"class": "discretized_gaussian", "config": {"levels": 17}},
    "model": {"class": "ReverseProcess", "config": {"variance": "large", "shape": [1, 8, 8]}},
    "grid": {"class": "GridPosteriorReverseProcess", "config": {"variance": "large", "shape": [1, 8, 8]}},
    "categorical": {"class": "CategoricalReverseProcess", "config": {"shape": [1, 8, 8]}},
    "uniform": {"class": "uniform", "config": {"T": 50}},
    "importance": {"class": "importance", "config": {"T": 50, "history": 10, "uniform_fraction": 0.001}},
}


def test_configs_in_the_stored_format_build_and_describe_themselves_unchanged():
    net = NETWORKS.build(STORED["network"])
    assert net(torch.zeros(2, 1, 8, 8), torch.tensor([1, 4])).shape == (2, 1, 8, 8)
    guide = GUIDES.build(STORED["guide"])
    b = [0.1, 0.2, 0.3, 0.4]
    np.testing.assert_allclose(guide.schedule.abar[1:].numpy(), np.cumprod([1 - x for x in b]), rtol=1e-15)
    learned = GUIDES.build(STORED["learned"])
    ends = learned.schedule.gamma(torch.tensor([0.0, 1.0], dtype=torch.float64))
    np.testing.assert_allclose(ends.detach().numpy(), [-13.3, 5.0], rtol=1e-12)  # gamma(0), gamma(1): the endpoints
    masked = GUIDES.build(STORED["masked"])
    alpha = [1 - math.cos(math.pi / 2 * (1 - t / 50)) for t in range(51)]  # the cosine masking schedule
    np.testing.assert_allclose(masked.schedule.alpha[1:-1].numpy(), alpha[1:-1], rtol=1e-12)
    decoder = LIKELIHOODS.build(STORED["likelihood"])
    assert decoder.levels == 17
    model = MODELS.build(STORED["model"], eps=net, schedule=guide.schedule, likelihood=decoder)
    np.testing.assert_allclose(model.sigma2[2:].numpy(), b[1:], rtol=1e-15)  # large: sigma_t^2 = beta_t, t >= 2
    grid_net = NETWORKS.build({"class": "unet", "config": dict(STORED["network"]["config"], out_channels=17)})
    grid = MODELS.build(STORED["grid"], eps=grid_net, schedule=guide.schedule, likelihood=decoder)
    cat_net = NETWORKS.build(
        {"class": "unet", "config": dict(STORED["network"]["config"], in_channels=2, out_channels=17)}
    )
    categorical = MODELS.build(STORED["categorical"], eps=cat_net, schedule=masked.schedule, likelihood=decoder)
    uniform, importance = TIMESTEPS.build(STORED["uniform"]), TIMESTEPS.build(STORED["importance"])
    np.testing.assert_array_equal(uniform.probs().numpy(), np.full(50, 1 / 50))
    assert tuple(importance.history.shape) == (50, 10) and importance.uniform_fraction == 0.001
    built = {
        "network": (NETWORKS, net),
        "guide": (GUIDES, guide),
        "learned": (GUIDES, learned),
        "masked": (GUIDES, masked),
        "likelihood": (LIKELIHOODS, decoder),
        "model": (MODELS, model),
        "grid": (MODELS, grid),
        "categorical": (MODELS, categorical),
        "uniform": (TIMESTEPS, uniform),
        "importance": (TIMESTEPS, importance),
    }
    for name, (registry, obj) in built.items():
        assert registry.describe(obj) == STORED[name], name


def test_named_schedules_are_built_from_their_spec():
    assert GUIDES.describe(LinearForwardProcess.from_spec(5, "linear", 1)) == {
        "class": "LinearForwardProcess",
        "config": {"T": 5, "beta_1": 1e-4, "beta_T": 0.02, "event_dim": 1},
    }
    assert LearnedForwardProcess.from_spec(5, "learned", 1).config() == {
        "T": 5,
        "hidden": 16,
        "gamma_min": -13.3,
        "gamma_max": 5.0,
        "seed": 0,
        "event_dim": 1,
    }
    message = one_line_error(lambda: LinearForwardProcess.from_spec(5, "cosine", 1))
    assert message == "LinearForwardProcess: schedule must be 'linear', got 'cosine'"

"""Networks: the paper's CIFAR-10 U-Net size, presets' shapes, one network call per training step, and the
callable wrapper's description."""

import pyro
import pytest
import torch
from pyro.infer import SVI, TraceMeanField_ELBO

from pyro_ddpm import protocol
from pyro_ddpm.elbo import objective
from pyro_ddpm.guides import ForwardProcess
from pyro_ddpm.likelihoods import DiscretizedGaussianLikelihood
from pyro_ddpm.models import ReverseProcess
from pyro_ddpm.nets import MLP, EpsNetwork, UNet, build_network, network_config, timestep_embedding
from pyro_ddpm.presets import NETWORKS as PRESETS
from pyro_ddpm.schedule import Schedule


def test_cifar10_preset_has_the_papers_35_7M_parameters():
    net = build_network(PRESETS["cifar10"])
    # Ho et al. (2020), Appendix B: 35.7M; the official TensorFlow model has exactly 35,746,307.
    assert sum(p.numel() for p in net.parameters()) == 35_746_307


@pytest.mark.parametrize("preset", ["digits", "mnist", "toy2d"])
def test_presets_map_inputs_to_outputs_of_the_same_shape(preset):
    net = build_network(PRESETS[preset])
    x = torch.randn(3, *net.shape)
    assert net(x, torch.tensor([1, 500, 1000])).shape == x.shape
    assert build_network(network_config(net)).config() == net.config()


def test_the_wrapper_describes_itself_without_the_callable_and_names_its_dtype():
    def fn(x, t):
        return x * t[:, None]

    wrapped = EpsNetwork(fn, zero_based=True, time_scale=0.5, dtype=torch.float64, shape=(2,))
    config = wrapped.config()
    assert config == {"zero_based": True, "time_scale": 0.5, "dtype": "float64", "shape": [2]}
    again = EpsNetwork.from_config(fn=fn, **config)
    x, t = torch.ones(2, 2), torch.tensor([1, 3])
    # (t - 1) * 0.5 in float64, the output cast back to the input's dtype
    torch.testing.assert_close(again(x, t), torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    assert again.dtype is torch.float64 and again.shape == (2,) and again.config() == config
    with pytest.raises(ValueError, match="'float65' names no torch dtype"):
        EpsNetwork(fn, dtype="float65")


def test_zero_initialized_output_and_time_dependence():
    net = UNet(resolution=8, in_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)
    x = torch.randn(2, 1, 8, 8)
    assert torch.count_nonzero(net(x, torch.tensor([1, 2]))) == 0  # the official init: eps_theta = 0
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.2)
    out1, out2 = net(x, torch.tensor([1, 1])), net(x, torch.tensor([900, 900]))
    assert not torch.allclose(out1, out2)


def test_timestep_embedding_is_the_transformer_sinusoid():
    t = torch.tensor([0, 3, 10])
    emb = timestep_embedding(t, 6)
    freqs = torch.tensor([1.0, 10000 ** (-1 / 2), 10000 ** (-2 / 2)])
    expected = torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], 1)
    torch.testing.assert_close(emb, expected)


class CountingMLP(MLP):
    calls = 0

    def forward(self, x, t):
        CountingMLP.calls += 1
        return super().forward(x, t)


@pytest.mark.parametrize("name", ["elbo", "simple"])
@pytest.mark.parametrize("K", [1, 5])
def test_one_network_call_per_training_step(name, K):
    schedule = Schedule.linear(10, 0.01, 0.2)
    net = CountingMLP(dim=3, hidden=8)
    model = ReverseProcess(net, schedule, "large", DiscretizedGaussianLikelihood(17))
    guide = ForwardProcess(schedule)
    train_model, weight = objective(name, model)
    svi = SVI(train_model.per_timestep, guide.per_timestep, pyro.optim.Adam({"lr": 1e-3}), TraceMeanField_ELBO())
    x0 = torch.randint(0, 17, (4, 3)).float() / 8 - 1
    CountingMLP.calls = 0
    svi.step(x0, protocol.draw_timesteps(4, K, schedule.T), weight)
    assert CountingMLP.calls == 1

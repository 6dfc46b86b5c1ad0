"""The folded, cached, batched flow step equals the authors' two-pass guided velocity."""

import pytest
import torch

from vssflow.export.conditions import ConditionDims, ConditionProjector
from vssflow.export.conditions import authors_state_dict as conditions_state_dict
from vssflow.export.flow_step import ConditionStage, FlowStep, latent_rate_features
from vssflow.export.reference import GuidedVelocity, ReferencePipeline
from vssflow.export.transformer import FlowDims, authors_state_dict, load_flow

# The real head layout and condition widths, a narrow transformer: realistic scale, CPU-fast.
REALISTIC = (FlowDims(in_channels=128 + 1824, width=256, num_layers=2, head_dim=64, num_kv_heads=2,
                      cross_dim=768, ff_inner=512), ConditionDims())
TINY = (FlowDims.preset("tiny"), ConditionDims.preset("tiny"))


def _parts(dims, seed=0):
    fd, cd = dims
    flow = load_flow(authors_state_dict(fd, generator=torch.Generator().manual_seed(seed)))
    cond = ConditionProjector(cd)
    cond.load_state_dict(conditions_state_dict(cd, generator=torch.Generator().manual_seed(seed + 1)))
    return flow, cond.eval()


def _features(cd: ConditionDims, t_len: int, seed=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 100, cd.clip_in, generator=g), torch.randn(1, 240, cd.synch_in, generator=g),
            torch.randint(0, 71, (1, t_len), generator=g), torch.randn(1, cd.speaker_in, generator=g))


@pytest.mark.parametrize("dims,t_len", [(TINY, 250), (TINY, 37), (REALISTIC, 60)],
                         ids=["tiny-250", "tiny-37", "realistic-60"])
def test_flow_step_equals_guided_velocity(dims, t_len):
    flow, cond = _parts(dims)
    clip, synch, ids, spk = _features(dims[1], t_len)
    ref = ReferencePipeline(flow, cond)
    context, channels = ref.encode_conditions(clip, synch, ids, spk, t_len)
    z = torch.randn(1, ref.audio_channels, t_len, generator=torch.Generator().manual_seed(3))
    stage, step = ConditionStage(flow, cond).eval(), FlowStep(flow, ref.audio_channels).eval()
    with torch.no_grad():
        bias, keys, values, k_channels = stage(*latent_rate_features(clip, synch, t_len), ids, spk)
        assert torch.equal(k_channels, channels)
        for t, w in [(0.0, 3.0), (0.37, 3.0), (0.9, 1.0), (0.5, 5.5)]:
            expected = GuidedVelocity(flow, context, channels.shape[1], w)(t, torch.cat([z, channels], 1))
            got = step(z, torch.tensor([t]), bias, keys, values, torch.tensor([w]))
            assert expected[:, ref.audio_channels:].abs().max() == 0
            assert expected.abs().max() > 0.5
            assert (got - expected[:, : ref.audio_channels]).abs().max() <= 1e-4, (t, w)


def test_batched_windows():
    """Two windows in one call give what each gives alone."""
    flow, cond = _parts(TINY)
    stage, step = ConditionStage(flow, cond).eval(), FlowStep(flow, 128).eval()
    outs, inputs = [], []
    with torch.no_grad():
        for seed in (4, 5):
            clip, synch, ids, spk = _features(TINY[1], 50, seed)
            bias, k, v, _ = stage(*latent_rate_features(clip, synch, 50), ids, spk)
            z = torch.randn(1, 128, 50, generator=torch.Generator().manual_seed(seed))
            outs.append(step(z, torch.tensor([0.3]), bias, k, v, torch.tensor([3.0])))
            inputs.append((z, bias, k, v))
        z, bias, k, v = (torch.cat(p, dim=1 if p[0].dim() == 5 else 0) for p in zip(*inputs))
        both = step(z, torch.tensor([0.3]), bias, k, v, torch.tensor([3.0]))
    assert (both - torch.cat(outs)).abs().max() <= 1e-4

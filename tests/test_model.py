import pytest
import torch

from napari_unet.model import UNet, count_parameters


def test_reference_unet_parameter_count():
    # the classic U-Net (64..1024 wide, transposed-conv decoder, bias-free DoubleConv)
    assert count_parameters(UNet(in_channels=3, out_channels=1)) == 31_037_633


def test_reference_structure():
    net = UNet(3, 1)
    assert [d[1][0].out_channels for d in net.downs] == [128, 256, 512, 1024]
    assert isinstance(net.ups[0].up, torch.nn.ConvTranspose2d)
    assert net.ups[0].up.kernel_size == (2, 2) and net.ups[0].up.stride == (2, 2)
    assert net.inc[0].bias is None  # conv bias off inside DoubleConv
    assert net.outc.kernel_size == (1, 1)


@pytest.mark.parametrize("shape", [(37, 51), (1, 1), (3, 200), (64, 64), (17, 8)])
def test_any_size_pads_and_crops(shape):
    net = UNet(1, 3, base_channels=4, depth=3).eval()
    with torch.no_grad():
        y = net(torch.randn(2, 1, *shape))
    assert y.shape == (2, 3, *shape)
    assert torch.isfinite(y).all()


def test_3d_and_interp_and_dropout():
    net = UNet(2, 4, base_channels=4, depth=2, ndim=3, up_mode="interp", dropout=0.1).eval()
    with torch.no_grad():
        y = net(torch.randn(1, 2, 9, 21, 10))
    assert y.shape == (1, 4, 9, 21, 10)
    assert count_parameters(net) < count_parameters(
        UNet(2, 4, base_channels=4, depth=2, ndim=3, up_mode="transpose")
    )


def test_skip_connections_carry_detail():
    # a 1-pixel impulse must influence the output at exactly that pixel region: with the skip
    # at full resolution the response is sharp, not smeared over a 2**depth block
    torch.manual_seed(0)
    net = UNet(1, 1, base_channels=4, depth=3).eval()
    x = torch.zeros(1, 1, 32, 32)
    with torch.no_grad():
        base = net(x)
        x[0, 0, 16, 16] = 10.0
        diff = (net(x) - base).abs()[0, 0]
    assert diff[16, 16] > 0
    assert diff.argmax() // 32 in range(14, 19)


def test_bad_arguments():
    with pytest.raises(ValueError, match="ndim"):
        UNet(1, 1, ndim=4)
    with pytest.raises(ValueError, match="up_mode"):
        UNet(1, 1, up_mode="pixelshuffle")
    net = UNet(1, 1, base_channels=4, depth=2)
    with pytest.raises(ValueError, match="input channel"):
        net(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="expects input"):
        net(torch.randn(1, 1, 4, 16, 16))


def test_config_round_trip():
    net = UNet(2, 3, base_channels=8, depth=2, ndim=3, up_mode="interp")
    again = UNet(**net.config())
    assert again.config() == net.config()
    again.load_state_dict(net.state_dict())

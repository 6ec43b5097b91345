"""The glimpse sensor takes exactly the pixels a hand computation says it should."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from modules import ModelConfig, Retina, location_to_pixels, patch_corners


def crop_and_pool(image, centre_x, centre_y, size, factor):
    """The straightforward reference: crop a size x size patch (zeros outside), pool by factor."""
    C, H, W = image.shape
    patch = torch.zeros(C, size, size, dtype=image.dtype)
    top, left = centre_y - size // 2, centre_x - size // 2
    for r in range(size):
        for c in range(size):
            y, x = top + r, left + c
            if 0 <= y < H and 0 <= x < W:
                patch[:, r, c] = image[:, y, x]
    return F.avg_pool2d(patch.unsqueeze(0), factor).squeeze(0) if factor > 1 else patch


def glimpse(cfg, images, l):
    retina = Retina(cfg)
    return retina(retina.prepare(images), l)  # (B, k, C, g, g)


def test_location_mapping_endpoints_and_centre():
    l = torch.tensor([[-1.0, -1.0], [0.0, 0.0], [1.0, 1.0], [0.5, -0.25]])
    assert location_to_pixels(l, 32).tolist() == [[0, 0], [16, 16], [32, 32], [24, 12]]


def test_centre_glimpse_equals_hand_computed_crops():
    cfg = ModelConfig()
    images = torch.rand(2, 3, 32, 32)
    phi = glimpse(cfg, images, torch.zeros(2, 2))
    # l = 0 is pixel 16: the 6, 12 and 24 px patches start at 13, 10 and 4 on both axes.
    assert torch.allclose(phi[:, 0], images[:, :, 13:19, 13:19])
    assert torch.allclose(phi[:, 1], F.avg_pool2d(images[:, :, 10:22, 10:22], 2), atol=1e-6)
    assert torch.allclose(phi[:, 2], F.avg_pool2d(images[:, :, 4:28, 4:28], 4), atol=1e-6)


@pytest.mark.parametrize("l", [(-1.0, -1.0), (1.0, -1.0), (-1.0, 1.0), (1.0, 1.0),
                               (0.5, -0.25), (-0.9, 0.7)])
def test_corner_and_off_centre_glimpses_equal_reference(l):
    cfg = ModelConfig()
    images = torch.rand(1, 3, 32, 32)
    phi = glimpse(cfg, images, torch.tensor([l]))
    cx, cy = location_to_pixels(torch.tensor(l), 32).tolist()
    for i, size in enumerate(cfg.patch_sizes):
        expected = crop_and_pool(images[0], cx, cy, size, size // cfg.patch_size)
        assert torch.allclose(phi[0, i], expected, atol=1e-6), (l, size)


def test_corner_patch_is_half_outside_with_zeros():
    cfg = ModelConfig()
    images = torch.rand(1, 3, 32, 32) + 1.0  # strictly positive, so zeros can only be padding
    phi = glimpse(cfg, images, torch.tensor([[-1.0, -1.0]]))
    finest = phi[0, 0]  # centred on pixel (0, 0): rows and columns -3..2
    assert torch.equal(finest[:, 3:, 3:], images[0, :, 0:3, 0:3])
    assert (finest[:, :3, :] == 0).all() and (finest[:, :, :3] == 0).all()


def test_x_runs_along_width_and_y_along_height():
    images = torch.zeros(1, 1, 32, 32)
    images[0, 0, 4, 28] = 1.0  # row 4 (top), column 28 (right)
    cx, cy = 28, 4
    l = torch.tensor([[cx / 16 - 1 + 1e-4, cy / 16 - 1 + 1e-4]])
    cfg = ModelConfig(num_patches=1, num_channels=1, pixel_mean=(0.0,), pixel_std=(1.0,))
    phi = glimpse(cfg, images, l)
    assert phi[0, 0, 0, 3, 3] == 1.0  # the bright pixel sits at the patch's centre cell


def test_batched_sensor_matches_reference_on_random_locations():
    cfg = ModelConfig(patch_size=5, glimpse_scale=3, num_patches=3)  # 5, 15, 45 px: odd sizes
    torch.manual_seed(0)
    images = torch.rand(16, 3, 32, 32)
    l = torch.rand(16, 2) * 2 - 1
    phi = glimpse(cfg, images, l)
    centres = location_to_pixels(l, 32).tolist()
    for b, (cx, cy) in enumerate(centres):
        for i, size in enumerate(cfg.patch_sizes):
            expected = crop_and_pool(images[b], cx, cy, size, size // cfg.patch_size)
            assert torch.allclose(phi[b, i], expected, atol=1e-5)


def test_patch_corners_follow_the_mapping():
    cfg = ModelConfig()
    corners = patch_corners(torch.tensor([[0.0, 0.0]]), 32, cfg.patch_sizes)
    assert corners.tolist() == [[[13, 13], [10, 10], [4, 4]]]


@pytest.mark.parametrize("size, channels, patches", [(60, 1, 3), (100, 1, 4), (28, 1, 1)])
def test_sensor_on_single_channel_and_other_image_sizes(size, channels, patches):
    """The MNIST benchmarks' sensors: 12 px patches at 3 or 4 scales on 60 and 100 px
    canvases, one 8 px patch on 28 px digits, one channel."""
    g = 8 if size == 28 else 12
    cfg = ModelConfig(image_size=size, num_channels=channels, patch_size=g, num_patches=patches,
                      pixel_mean=(0.0,) * channels, pixel_std=(1.0,) * channels)
    torch.manual_seed(size)
    images = torch.rand(6, channels, size, size)
    l = torch.cat([torch.rand(4, 2) * 2 - 1, torch.tensor([[-1.0, 1.0], [1.0, 1.0]])])
    phi = glimpse(cfg, images, l)
    assert phi.shape == (6, patches, channels, g, g)
    for b, (cx, cy) in enumerate(location_to_pixels(l, size).tolist()):
        for i, side in enumerate(cfg.patch_sizes):
            expected = crop_and_pool(images[b], cx, cy, side, side // g)
            assert torch.allclose(phi[b, i], expected, atol=1e-5), (b, side)


@pytest.mark.parametrize("size, channels, g, s, k", [
    (32, 3, 6, 2, 3),  # the seed's 6, 12, 24 px patches
    (28, 1, 8, 2, 1),  # MNIST's single 8 px patch (1 px of padding)
    (21, 2, 5, 3, 2),  # odd sizes, scale 3
])
def test_every_centre_pixel_matches_a_padded_crop(size, channels, g, s, k):
    """All (S + 1)^2 glimpse centres, so every clamped box start of the index table is hit:
    boxes wholly outside the image must read zeros, the others the image's pixels."""
    cfg = ModelConfig(image_size=size, num_channels=channels, patch_size=g, glimpse_scale=s,
                      num_patches=k, pixel_mean=(0.0,) * channels, pixel_std=(1.0,) * channels)
    torch.manual_seed(1)
    images = torch.rand(1, channels, size, size)
    # The middle of each pixel's range of locations, and l = 1 for the far edge: centres 0..size.
    steps = ((torch.arange(size + 1) + 0.5) / (size / 2) - 1).clamp(max=1.0)
    l = torch.stack(torch.meshgrid(steps, steps, indexing="xy"), -1).reshape(-1, 2)
    centres = location_to_pixels(l, size)
    assert len(set(map(tuple, centres.tolist()))) == (size + 1) ** 2
    phi = glimpse(cfg, images.expand(len(l), -1, -1, -1).contiguous(), l)
    pad = cfg.largest_patch
    padded = F.pad(images[0], (pad, pad, pad, pad))
    for n, (cx, cy) in enumerate(centres.tolist()):
        for i, side in enumerate(cfg.patch_sizes):
            top, left = pad + cy - side // 2, pad + cx - side // 2
            crop = padded[:, top:top + side, left:left + side]
            expected = F.avg_pool2d(crop.unsqueeze(0), side // cfg.patch_size).squeeze(0)
            assert torch.allclose(phi[n, i], expected, atol=1e-5), (cx, cy, side)


def test_index_table_stays_out_of_the_checkpoint_but_moves_with_the_module():
    """The sensor's lookup table is rebuilt from the configuration, never saved or broadcast,
    and follows the module's .to() like a buffer (casts leave its integers alone)."""
    retina = Retina(ModelConfig())
    assert dict(retina.named_buffers()).keys() == {"inv_area"}
    assert retina.state_dict() == {}
    table = retina.index_table
    retina.to(torch.float64)
    assert retina.index_table.dtype == torch.int64 and torch.equal(retina.index_table, table)
    retina.to("meta")
    assert retina.index_table.device.type == "meta"


def shifted(image, fx, fy):
    """The image moved by (fx, fy) of a pixel towards the top left, linearly interpolated, on a
    canvas one pixel larger each side (the moved image reaches one pixel before the first):
    pixel (y, x) of the result is the image's (y - 1 + fy, x - 1 + fx), zeros outside it."""
    padded = F.pad(image, (1, 1, 1, 1))
    right = F.pad(padded[..., :, 1:], (0, 1))  # pixel (y, x) holds (y, x + 1)
    rows = (1 - fx) * padded + fx * right
    below = F.pad(rows[..., 1:, :], (0, 0, 0, 1))
    return (1 - fy) * rows + fy * below


@pytest.mark.parametrize("cfg", [ModelConfig(location_grad="pathwise"),
                                 ModelConfig(image_size=28, num_channels=1, patch_size=8,
                                             num_patches=1, pixel_mean=(0.0,), pixel_std=(1.0,),
                                             location_grad="pathwise")])
def test_between_pixels_is_a_crop_of_the_subpixel_shifted_image(cfg):
    """location_grad=pathwise: a centre p = c + f between pixels reads the crops around c of
    the image moved by f, near the borders and in the middle alike."""
    torch.manual_seed(2)
    size = cfg.image_size
    images = torch.rand(5, cfg.num_channels, size, size, dtype=torch.float64)
    pixels = torch.tensor([[0, 0], [16, 9], [size - 1, 3], [7, size - 1], [size - 1, size - 1]])
    fraction = torch.tensor([[0.25, 0.5], [0.75, 0.1], [0.5, 0.9], [0.0, 0.6], [0.3, 0.3]])
    phi = glimpse(cfg, images, (pixels + fraction) / (size / 2) - 1)
    for b, (cx, cy) in enumerate(pixels.tolist()):
        moved = shifted(images[b], *fraction[b].tolist())  # pixel c of the image is c + 1 here
        for i, side in enumerate(cfg.patch_sizes):
            expected = crop_and_pool(moved, cx + 1, cy + 1, side, side // cfg.patch_size)
            assert torch.allclose(phi[b, i], expected, atol=1e-10), (b, side)


def test_between_pixels_equals_the_pixel_sensor_on_whole_pixels_and_has_a_gradient():
    cfg = ModelConfig(location_grad="pathwise")
    torch.manual_seed(3)
    images = torch.rand(4, 3, 32, 32, dtype=torch.float64)
    whole = torch.tensor([[0.0, 0.0], [-1.0, 1.0], [0.5, -0.25], [1.0, 1.0]], dtype=torch.float64)
    plain = dataclasses.replace(cfg, location_grad="none")
    assert torch.allclose(glimpse(cfg, images, whole), glimpse(plain, images, whole))
    retina = Retina(cfg).double()
    prepared = retina.prepare(images)
    l = torch.tensor([[0.13, -0.41], [0.52, 0.27], [-0.71, 0.05], [0.33, 0.66]],
                     dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda l: retina(prepared, l), (l,))

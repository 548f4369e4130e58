"""What AUTOMATIC1111 users expect around a mask: blur, invert, "fill", "only masked" with padding,
and outpainting; each against a reference (scipy's Gaussian filter, a hand-computed box, the same
call with the mask inverted by hand) and with the pixels outside the (blurred) mask bit-identical."""

import numpy as np
import pytest
import torch
from helpers import stroke_picture as picture
from PIL import Image

from ldm.editing import crop_region, fill_masked, gaussian_blur

KW = dict(num_inference_steps=3, seed=4, progress=False)


def box_mask(x0, y0, x1, y1, size=64) -> Image.Image:
    m = np.zeros((size, size), np.uint8)
    m[y0:y1, x0:x1] = 255
    return Image.fromarray(m)


@pytest.mark.parametrize("sigma", [1, 2.5, 4])
def test_the_mask_blur_is_opencvs_gaussian(sigma):
    from scipy.ndimage import gaussian_filter

    x = torch.zeros(1, 1, 40, 48)
    x[0, 0, 5:20, 30:47] = 1  # touches the border: OpenCV mirrors without repeating the edge ("mirror" in scipy)
    radius = int(2.5 * sigma + 0.5)
    expected = gaussian_filter(x[0, 0].double().numpy(), sigma, mode="mirror", truncate=radius / sigma)
    assert np.abs(gaussian_blur(x, sigma)[0, 0].numpy() - expected).max() < 1e-6


def test_fill_paints_the_hole_from_its_surroundings_and_keeps_the_rest():
    image = torch.full((1, 3, 32, 32), -1.0)
    image[:, 0] = 0.6  # one flat colour ...
    image[:, :, 10:20, 10:20] = torch.tensor([-0.8, 0.9, 0.1])[:, None, None]  # ... with an object in the hole
    mask = torch.zeros(1, 1, 32, 32)
    mask[:, :, 8:22, 8:22] = 1
    filled = fill_masked(image, mask)
    assert torch.equal(filled[mask.expand_as(image) == 0], image[mask.expand_as(image) == 0])
    hole = filled[0, :, 8:22, 8:22]  # the surroundings' colour, to 8 bits
    # premultiplied 8-bit layers of tiny alpha round: a few levels
    assert torch.allclose(hole, torch.tensor([0.6, -1, -1])[:, None, None].expand_as(hole), atol=6 / 255)


def test_the_crop_region_by_hand():
    mask = torch.zeros(64, 64)
    mask[10:20, 40:50] = 1
    assert crop_region(mask, 4, 64, 64) == (36, 6, 54, 24)  # the box, grown by 4 px
    assert crop_region(mask, 4, 64, 32) == (27, 6, 63, 24)  # widened to 2:1 about its centre
    assert crop_region(mask, 30, 64, 64) == (10, 0, 64, 54)  # clipped at the image, then squared inside it
    assert crop_region(mask, 0, 128, 128) == (40, 10, 50, 20)


def test_mask_invert_is_the_inverted_mask(tiny_pipe):
    mask = box_mask(0, 0, 32, 64)
    inverted = tiny_pipe("a red circle", image=picture(), mask_image=mask, mask_invert=True, **KW)
    by_hand = tiny_pipe("a red circle", image=picture(), mask_image=box_mask(32, 0, 64, 64), **KW)
    assert np.array_equal(np.asarray(inverted.images[0]), np.asarray(by_hand.images[0]))
    assert "Mask mode: Inpaint not masked" in inverted.parameters[0]
    with pytest.raises(ValueError, match="with mask_invert, black .* marks what to repaint"):
        tiny_pipe("a red circle", image=picture(), mask_image=box_mask(0, 0, 64, 64), mask_invert=True, **KW)


def test_a_blurred_mask_blends_an_edge_and_keeps_everything_beyond_it(tiny_pipe):
    out = tiny_pipe("a red circle", image=picture(), mask_image=box_mask(32, 0, 64, 64), mask_blur=4, **KW)
    a, b = np.asarray(out.images[0]).astype(int), np.asarray(picture()).astype(int)
    reach = int(2.5 * 4 + 0.5)  # the blur's radius
    assert np.array_equal(a[:, : 32 - reach], b[:, : 32 - reach])
    assert np.abs(a[:, 32 - reach : 32] - b[:, 32 - reach : 32]).max() > 0  # the soft edge reaches outside
    assert "Mask blur: 4" in out.parameters[0]


def test_only_masked_draws_the_box_at_the_model_size_and_pastes_it_back(tiny_pipe):
    shapes = []
    hook = tiny_pipe.unet.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape[-2:])))
    try:
        out = tiny_pipe("a red circle", image=picture(), mask_image=box_mask(40, 8, 52, 20), inpaint_area="masked",
                        masked_padding=4, **KW)
    finally:
        hook.remove()
    f = tiny_pipe.latent_factor
    assert set(shapes) == {(tiny_pipe.default_size // f, tiny_pipe.default_size // f)}  # the 20 px box, drawn at 64
    a, b = np.asarray(out.images[0]), np.asarray(picture())
    assert a.shape == b.shape
    outside = np.ones((64, 64), bool)
    outside[8:20, 40:52] = False
    assert np.array_equal(a[outside], b[outside])
    assert not np.array_equal(a[8:20, 40:52], b[8:20, 40:52])
    assert "Inpaint area: Only masked, Masked area padding: 4" in out.parameters[0]


def test_outpainting_grows_the_canvas_and_keeps_the_picture(tiny_pipe):
    out = tiny_pipe("a red circle", image=picture(), outpaint=(16, 0, 13, 8), **KW)  # 13: right grows to 16
    a = np.asarray(out.images[0])
    assert a.shape == (72, 96, 3)
    assert np.array_equal(a[0:64, 16:80], np.asarray(picture()))
    assert 'Outpaint: "16,0,13,8"' in out.parameters[0] and "Size: 96x72" in out.parameters[0]


def test_fill_changes_what_is_encoded_not_what_is_kept(tiny_pipe):
    edit = tiny_pipe.prepare_edit(picture(), box_mask(0, 0, 32, 32), 1, None, None, masked_content="fill")
    assert torch.equal(edit.canvas, tiny_pipe.prepare_images(picture(), 1, None, None))
    block = edit.source[0, :, 8:30, 6:28]  # the red block, under the mask: filled with the gray around it
    assert (block - (128 / 127.5 - 1)).abs().max() < 0.15  # (a tint of the blue block nearby)
    out = tiny_pipe("a red circle", image=picture(), mask_image=box_mask(0, 0, 32, 32), masked_content="fill",
                    strength=0.5, **KW)
    assert "Masked content: fill" in out.parameters[0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mask_image=None, mask_blur=4), r"mask_blur applies to inpainting: pass mask_image"),
        (dict(mask_image=None, inpaint_area="masked", mask_invert=True), r"mask_invert, inpaint_area apply to"),
        (dict(mask_blur=-1), r"mask_blur is a blur radius in pixels in \[0, 256\], got -1"),
        (dict(masked_content="latent noise"), r"unknown masked_content 'latent noise'; choose one of: original, fill"),
        (dict(inpaint_area="only"), r"unknown inpaint_area 'only'; choose one of: whole, masked"),
        (dict(masked_padding=-2), r"masked_padding must be a whole number of pixels ≥ 0, got -2"),
        (dict(outpaint=(8, 0, 0, 0)), r"pass mask_image or outpaint, not both"),
        (dict(mask_image=None, outpaint=(0, 0, 0, 0)), r"outpaint must be four whole numbers .* not all 0"),
        (dict(mask_image=None, outpaint=(8, 0, 0)), r"outpaint must be four whole numbers"),
        (dict(mask_image=None, outpaint=(8, 0, 0, 0), height=64), r"outpaint sets the size"),
        (dict(mask_image=None, image=None, outpaint=(8, 0, 0, 0)), r"outpaint needs image"),
    ],
)
def test_bad_mask_options_are_value_errors(tiny_pipe, kwargs, message):
    kwargs = {"image": picture(), "mask_image": box_mask(32, 0, 64, 64), **KW, **kwargs}
    with pytest.raises(ValueError, match=message):
        tiny_pipe("a red circle", **kwargs)

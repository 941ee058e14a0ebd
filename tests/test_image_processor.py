"""Image processors against transformers 5.23's PIL backend: exact one within 1e-5, fast one MAD <= 0.02.

~60 images: scikit-image photographs, random images from 1x1 to 4000x40 (1x3000 and 3000x1 included), every
Pillow mode, numpy/torch layouts; batches, other settings and pinpoints, config files, inputs by path/URL/bytes.
"""

from __future__ import annotations

import atexit
import base64
import functools
import json
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from llava_next.model.anyres import AnyresGeometry
from llava_next.errors import InvalidImageError
from llava_next.preprocess.image_processor import LlavaNextImageProcessor
from llava_next.preprocess.image_processor_fast import LlavaNextImageProcessorFast
from hub_files import HUB_PREPROCESSOR_CONFIG, write_hub_preprocessor_config

EXACT_TOL = 1e-5
FAST_MAD = 0.02
OTHER_PINPOINTS = [[336, 336], [336, 672], [672, 336], [672, 672], [336, 1008], [1008, 336], [336, 1344],
                   [1344, 336], [1008, 1008]]


@functools.lru_cache(maxsize=None)
def reference_class():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    return LlavaNextImageProcessorPil


@functools.lru_cache(maxsize=None)
def hub_folder() -> Path:
    """A folder holding the literal llava-hf preprocessor_config.json (tests/hub_files.py), made once."""
    root = Path(tempfile.mkdtemp(prefix="llava_next_hub_preprocessor_"))
    atexit.register(shutil.rmtree, root, True)
    return write_hub_preprocessor_config(root / "llava-v1.6-mistral-7b-hf")


@functools.lru_cache(maxsize=None)
def reference():
    """transformers' processor loaded from the literal hub preprocessor_config.json: an oracle that shares
    nothing with our defaults (CLIP_MEAN, to_dict), which the catalogue tests compare with."""
    return reference_class().from_pretrained(str(hub_folder()))


EXACT, FAST = LlavaNextImageProcessor(), LlavaNextImageProcessorFast()


def _random(h, w, seed=0, channels=3):
    shape = (h, w, channels) if channels else (h, w)
    return np.random.default_rng(seed + h * 7 + w).integers(0, 256, shape, dtype=np.uint8)


def _catalogue() -> dict:
    """name -> (image, preprocess kwargs)."""
    import skimage.data as data

    cases = {}
    for name in ("chelsea", "astronaut", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                 "colorwheel", "retina", "logo", "camera", "coins", "moon", "text", "page", "clock", "grass",
                 "cell", "checkerboard", "microaneurysms"):
        cases[f"photo-{name}"] = (Image.fromarray(getattr(data, name)()), {})
    for h, w in ((1, 1), (1, 3000), (3000, 1), (4000, 40), (40, 4000), (2, 2), (3, 5), (17, 333), (336, 336),
                 (337, 335), (500, 316), (750, 1000), (200, 300), (1008, 336), (336, 1008), (672, 672), (100, 1000),
                 (999, 101), (64, 64), (300, 200)):
        cases[f"random-{h}x{w}"] = (Image.fromarray(_random(h, w)), {})
    base = Image.fromarray(data.coffee()[::3, ::3])  # 134 x 200
    la = base.convert("LA")
    la.putalpha(Image.fromarray(_random(*la.size[::-1], channels=0)))
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.fromarray(_random(*base.size[::-1], seed=1, channels=0)))
    p_transparent = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    p_transparent.info["transparency"] = 7
    i16 = Image.fromarray((_random(134, 200, channels=0).astype(np.uint16) * 3))  # values to 765: some clip
    f32 = Image.fromarray(np.linspace(-20, 300, 134 * 200, dtype=np.float32).reshape(134, 200))
    modes = {"1": base.convert("1"), "L": base.convert("L"), "LA": la, "P": base.convert("P"),
             "P+transparency": p_transparent, "PA": rgba.convert("PA"), "RGBA": rgba, "CMYK": base.convert("CMYK"),
             "I;16": i16, "I": i16.convert("I"), "F": f32, "YCbCr": base.convert("YCbCr"), "LAB": base.convert("LAB"),
             "HSV": base.convert("HSV"), "RGBX": base.convert("RGBX")}
    for mode, image in modes.items():
        cases[f"mode-{mode}"] = (image, {})
    chelsea = data.chelsea()
    cases["np-hwc-uint8"] = (chelsea, {})
    cases["np-chw-uint8"] = (np.moveaxis(data.coffee(), -1, 0).copy(), {})
    cases["np-hw1-uint8"] = (data.camera()[..., None], {})
    cases["np-hwc-rgba-uint8"] = (data.logo(), {})
    cases["np-hwc-float-0-1"] = (chelsea / 255.0, {"do_rescale": False})
    cases["np-chw-rgba-float"] = (np.random.default_rng(3).random((4, 90, 70)).astype(np.float32), {"do_rescale": False})
    cases["np-hwc-int64"] = (chelsea.astype(np.int64), {})
    cases["torch-chw-uint8"] = (torch.from_numpy(data.rocket()).permute(2, 0, 1), {})
    return cases


CASES = _catalogue()


@functools.lru_cache(maxsize=None)
def outputs(name: str):
    """(reference, exact, fast) outputs for one catalogue case, each as numpy."""
    image, kwargs = CASES[name]
    ref = reference()(image, return_tensors="np", **kwargs)
    ours = EXACT(image, return_tensors="np", **kwargs)
    fast = FAST(image, return_tensors="np", **kwargs)
    return ref, ours, fast


def test_catalogue_is_large_enough():
    assert len(CASES) >= 40


@pytest.mark.parametrize("name", list(CASES))
def test_exact_matches_transformers(name):
    ref, ours, _ = outputs(name)
    assert ours["pixel_values"].dtype == np.float32 and ours["image_sizes"].dtype == np.int64
    assert ours["pixel_values"].shape == ref["pixel_values"].shape  # (1, tiles, 3, 336, 336)
    assert np.abs(ours["pixel_values"] - ref["pixel_values"]).max() <= EXACT_TOL
    assert np.array_equal(ours["image_sizes"], np.asarray(ref["image_sizes"]))
    h, w = (int(v) for v in ours["image_sizes"][0])
    assert ours["pixel_values"].shape[1] == AnyresGeometry().num_tiles(h, w)


@pytest.mark.parametrize("name", list(CASES))
def test_fast_is_close_to_exact(name):
    _, ours, fast = outputs(name)
    assert fast["pixel_values"].shape == ours["pixel_values"].shape
    assert np.array_equal(fast["image_sizes"], ours["image_sizes"])
    assert np.abs(fast["pixel_values"] - ours["pixel_values"]).mean() <= FAST_MAD


def test_fast_deviation_overall():
    diffs = [np.abs(outputs(n)[2]["pixel_values"] - outputs(n)[1]["pixel_values"]) for n in CASES]
    mad = float(np.concatenate([d.ravel() for d in diffs]).mean())
    worst = max(float(d.max()) for d in diffs)
    worst_mad = max(float(d.mean()) for d in diffs)
    print(f"\nfast vs exact over {len(CASES)} images: MAD {mad:.2e}, worst image MAD {worst_mad:.2e}, max {worst:.4f}")
    assert mad <= FAST_MAD / 10  # in practice ~1e-4
    assert worst <= 0.05  # two 8-bit levels at most (one level is ~0.015); a wrong pass order gives ~0.3


# ----- the hub preprocessor_config.json, loaded by both libraries -----

HUB_IMAGES = ("photo-chelsea", "photo-astronaut", "random-500x316", "random-1x3000", "mode-L", "mode-RGBA")


def test_reference_reads_the_hub_file():
    """The oracle really is the hub file: transformers' processor holds its literal values."""
    ref = reference()
    assert [float(v) for v in ref.image_mean] == HUB_PREPROCESSOR_CONFIG["image_mean"]
    assert [float(v) for v in ref.image_std] == HUB_PREPROCESSOR_CONFIG["image_std"]
    assert [list(p) for p in ref.image_grid_pinpoints] == HUB_PREPROCESSOR_CONFIG["image_grid_pinpoints"]
    assert ref.rescale_factor == HUB_PREPROCESSOR_CONFIG["rescale_factor"]


@pytest.mark.parametrize("cls", [LlavaNextImageProcessor, LlavaNextImageProcessorFast])
def test_default_settings_are_the_hub_file(cls):
    """Our defaults (no config file at all) are the llava-hf checkpoints' values, compared with the literal file."""
    settings = cls().to_dict()
    for key, value in HUB_PREPROCESSOR_CONFIG.items():
        if key in ("aspect_ratio_setting", "processor_class"):  # bookkeeping keys the hub file adds
            continue
        assert settings[key] == value, key


@pytest.mark.parametrize("name", HUB_IMAGES)
def test_both_libraries_load_the_hub_folder(name):
    """Ours (exact and fast) and transformers' (AutoImageProcessor) all load the same literal hub folder."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers import AutoImageProcessor

        theirs = AutoImageProcessor.from_pretrained(str(hub_folder()))
    exact = LlavaNextImageProcessor.from_pretrained(hub_folder())
    fast = LlavaNextImageProcessorFast.from_pretrained(str(hub_folder()))
    assert isinstance(fast, LlavaNextImageProcessorFast)
    assert list(exact.image_mean) == list(fast.image_mean) == HUB_PREPROCESSOR_CONFIG["image_mean"]
    image, kwargs = CASES[name]
    ref = theirs(image, return_tensors="np", **kwargs)
    ours = exact(image, return_tensors="np", **kwargs)
    assert ours["pixel_values"].shape == ref["pixel_values"].shape
    assert np.abs(ours["pixel_values"] - ref["pixel_values"]).max() <= EXACT_TOL
    assert np.array_equal(ours["image_sizes"], np.asarray(ref["image_sizes"]))
    quick = fast(image, return_tensors="np", **kwargs)
    assert quick["pixel_values"].shape == ref["pixel_values"].shape
    assert np.abs(quick["pixel_values"] - ref["pixel_values"]).mean() <= FAST_MAD


@pytest.mark.parametrize("name", HUB_IMAGES)
def test_fast_defaults_match_transformers_on_the_hub_file(name):
    """The fast processor with no config file against transformers on the hub file (not only against ours)."""
    image, kwargs = CASES[name]
    ref = reference()(image, return_tensors="np", **kwargs)
    fast = FAST(image, return_tensors="np", **kwargs)
    assert fast["pixel_values"].shape == ref["pixel_values"].shape
    assert np.abs(fast["pixel_values"] - ref["pixel_values"]).mean() <= FAST_MAD


def test_demo_and_fixture_folders_write_the_hub_preprocessor_config(tmp_path):
    """The hub files our demo checkpoint (and the processor test fixtures) write carry the literal hub values."""
    from tokenizers import Tokenizer, models

    from llava_next.entrypoints.demo import write_hub_processor_files

    tokenizer = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    write_hub_processor_files(tmp_path, tokenizer, "{{ messages }}")
    assert json.loads((tmp_path / "preprocessor_config.json").read_text()) == HUB_PREPROCESSOR_CONFIG


# ----- batches -----

def _batch():
    return [CASES["photo-chelsea"][0], CASES["random-1x3000"][0], CASES["photo-astronaut"][0],
            CASES["mode-L"][0], CASES["random-3000x1"][0]]


def test_mixed_batch_pads_tiles_like_transformers():
    images = _batch()
    ref = reference()(images, return_tensors="np")
    ours = EXACT(images, return_tensors="pt")
    assert isinstance(ours["pixel_values"], torch.Tensor) and ours["pixel_values"].dtype == torch.float32
    assert ours["image_sizes"].dtype == torch.int64
    assert ours["pixel_values"].shape == (5, 5, 3, 336, 336)
    assert np.abs(ours["pixel_values"].numpy() - ref["pixel_values"]).max() <= EXACT_TOL
    assert np.array_equal(ours["image_sizes"].numpy(), ref["image_sizes"])
    assert (ours["pixel_values"][1, 3:] == 0).all()  # 3 real tiles, 2 zero tiles
    fast = FAST(images)
    assert (fast["pixel_values"] - ours["pixel_values"]).abs().mean() <= FAST_MAD
    assert (fast["pixel_values"][1, 3:] == 0).all()


def test_nested_lists_are_one_flat_batch():
    a, b, c = _batch()[:3]
    nested = EXACT([[a, b], [c]], return_tensors="np")
    flat = EXACT([a, b, c], return_tensors="np")
    assert np.array_equal(nested["pixel_values"], flat["pixel_values"])
    assert np.array_equal(FAST([[a], [b, c]])["pixel_values"], FAST([a, b, c])["pixel_values"])


def test_fast_groups_same_size_images_without_changing_results():
    x, y = Image.fromarray(_random(300, 200, seed=1)), Image.fromarray(_random(300, 200, seed=2))
    z = CASES["photo-coffee"][0]
    together = FAST([x, z, y])["pixel_values"]  # (3, 5, 3, 336, 336): x and y have 3 tiles, z has 5
    for k, image in enumerate((x, z, y)):
        alone = FAST(image)["pixel_values"][0]
        assert torch.equal(together[k, :len(alone)], alone)
        assert (together[k, len(alone):] == 0).all()


def test_no_padding_returns_lists_like_transformers():
    images = _batch()[:2]
    ref = reference()(images, do_pad=False)
    ours = EXACT(images, do_pad=False)
    assert [p.shape[0] for p in ours["pixel_values"]] == [3, 3]
    for r, o in zip(ref["pixel_values"], ours["pixel_values"]):
        assert np.abs(r - o).max() <= EXACT_TOL
    assert [tuple(s) for s in ours["image_sizes"]] == [tuple(s) for s in ref["image_sizes"]]
    with pytest.raises(ValueError, match="do_pad"):
        EXACT([CASES["photo-chelsea"][0], CASES["photo-astronaut"][0]], do_pad=False, return_tensors="pt")
    assert len(FAST(images, do_pad=False, return_tensors=None)["pixel_values"]) == 2


# ----- other settings, all compared with transformers -----

SETTINGS = {
    "other-pinpoints": {"image_grid_pinpoints": OTHER_PINPOINTS},
    "pinpoints-not-tile-multiples": {"image_grid_pinpoints": [[400, 500], [500, 400], [700, 700]]},
    "size-height-width": {"size": {"height": 336, "width": 336}},
    "tile-224": {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224},
                 "image_grid_pinpoints": [[448, 448], [224, 672], [672, 224]]},
    "no-normalize": {"do_normalize": False},
    "no-rescale-no-normalize": {"do_rescale": False, "do_normalize": False},
    "custom-mean-std": {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.5, 1.0]},
    "bilinear": {"resample": 2},
    "no-resize-no-crop": {"do_resize": False, "do_center_crop": False},
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_settings_match_transformers(setting):
    kwargs = SETTINGS[setting]
    images = [CASES["photo-chelsea"][0], CASES["random-17x333"][0], CASES["mode-RGBA"][0]]
    ref = reference()(images, return_tensors="np", **kwargs)
    ours = EXACT(images, return_tensors="np", **kwargs)
    assert ours["pixel_values"].dtype == ref["pixel_values"].dtype
    assert ours["pixel_values"].shape == ref["pixel_values"].shape
    assert np.abs(ours["pixel_values"].astype(np.float64) - ref["pixel_values"]).max() <= EXACT_TOL
    fast = FAST(images, return_tensors="np", **kwargs)
    assert fast["pixel_values"].shape == ours["pixel_values"].shape
    assert fast["pixel_values"].dtype == ours["pixel_values"].dtype
    scale = 255.0 if not (kwargs.get("do_rescale", True) or kwargs.get("do_normalize", True)) else 1.0
    mad = np.abs(fast["pixel_values"].astype(np.float64) - ours["pixel_values"]).mean() / scale
    assert mad <= FAST_MAD


def test_processor_level_settings_persist_and_call_overrides_win():
    processor = LlavaNextImageProcessor(image_grid_pinpoints=OTHER_PINPOINTS, do_pad=False)
    image = CASES["random-40x4000"][0]
    assert processor(image, return_tensors="np")["pixel_values"].shape[1] == AnyresGeometry(
        tuple(map(tuple, OTHER_PINPOINTS))).num_tiles(40, 4000)
    assert processor(image, return_tensors="np", image_grid_pinpoints=[[336, 336]])["pixel_values"].shape[1] == 2


# ----- inputs by path, URL and bytes -----

def test_paths_urls_and_bytes_equal_pil_input(tmp_path):
    image = CASES["photo-coffee"][0]
    path = tmp_path / "coffee.png"
    image.save(path)
    data = path.read_bytes()
    expected = EXACT(image, return_tensors="np")["pixel_values"]
    for source in (str(path), path, path.as_uri(), data, "data:image/png;base64," + base64.b64encode(data).decode()):
        assert np.array_equal(EXACT(source, return_tensors="np")["pixel_values"], expected)
    assert np.abs(FAST(str(path), return_tensors="np")["pixel_values"] - expected).mean() <= FAST_MAD


def test_rgba_file_is_composited_on_white_unlike_transformers_loader(tmp_path):
    """Documented difference: transformers' load_image drops alpha for paths; we composite like its PIL path."""
    rgba = CASES["mode-RGBA"][0]
    path = tmp_path / "rgba.png"
    rgba.save(path)
    ours = EXACT(str(path), return_tensors="np")["pixel_values"]
    assert np.abs(ours - reference()(rgba, return_tensors="np")["pixel_values"]).max() <= EXACT_TOL
    assert np.abs(ours - reference()(str(path), return_tensors="np")["pixel_values"]).max() > 0.1


def test_exif_rotated_jpeg_path_gives_displayed_size(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(_random(300, 500)).save(path, exif=exif.tobytes())
    assert EXACT(str(path), return_tensors="np")["image_sizes"].tolist() == [[500, 300]]
    assert FAST(str(path))["image_sizes"].tolist() == [[500, 300]]


def test_bad_images_raise_typed_errors_and_processing_goes_on():
    for bad in (b"", b"not an image at all", "ftp://host/x.png", "data:image/png;base64,***"):
        with pytest.raises(InvalidImageError):
            EXACT(bad)
        with pytest.raises(InvalidImageError):
            FAST(bad)
    with pytest.raises(FileNotFoundError):
        EXACT("/no/such/image.png")
    with pytest.raises(ValueError, match="channel"):
        EXACT(np.zeros((10, 10, 2), np.uint8))
    with pytest.raises(ValueError, match="no images"):
        EXACT([])
    with pytest.raises(InvalidImageError, match="unsupported image type"):
        EXACT(object())
    ref, ours, _ = outputs("photo-chelsea")
    again = EXACT(CASES["photo-chelsea"][0], return_tensors="np")
    assert np.array_equal(again["pixel_values"], ours["pixel_values"])


def test_bad_arguments():
    image = CASES["random-64x64"][0]
    with pytest.raises(ValueError, match="return_tensors"):
        EXACT(image, return_tensors="tf")
    with pytest.raises(TypeError, match="unknown"):
        EXACT(image, do_magic=True)
    with pytest.raises(TypeError, match="unknown"):
        LlavaNextImageProcessor(sizes=3)
    with pytest.raises(ValueError, match="image_mean"):
        EXACT(image, image_mean=[0.5, 0.5])
    with pytest.raises(ValueError, match="size"):
        EXACT(image, size={"longest_edge": 336})
    with pytest.raises(ValueError):
        EXACT(image, image_grid_pinpoints=[])


# ----- config files -----

def test_save_pretrained_loads_in_transformers_and_back(tmp_path):
    ours = LlavaNextImageProcessor(image_grid_pinpoints=OTHER_PINPOINTS)
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert config["image_processor_type"] == "LlavaNextImageProcessor" and config["size"] == {"shortest_edge": 336}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers import AutoImageProcessor

        theirs = AutoImageProcessor.from_pretrained(str(tmp_path))
    image = CASES["random-40x4000"][0]
    a, b = ours(image, return_tensors="np"), theirs(image, return_tensors="np")
    assert a["pixel_values"].shape == b["pixel_values"].shape
    assert np.abs(a["pixel_values"] - b["pixel_values"]).max() <= EXACT_TOL


def test_from_pretrained_reads_transformers_and_llava_hf_configs(tmp_path):
    reference_class()(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(tmp_path)
    loaded = LlavaNextImageProcessor.from_pretrained(tmp_path)
    assert loaded.size == {"shortest_edge": 224} and loaded.crop_size == {"height": 224, "width": 224}
    fast = LlavaNextImageProcessorFast.from_pretrained(str(tmp_path), do_pad=False)
    assert isinstance(fast, LlavaNextImageProcessorFast) and fast.do_pad is False
    llava_hf = {  # the hub file of llava-hf/llava-v1.6-mistral-7b-hf, with its extra keys
        "aspect_ratio_setting": "anyres", "crop_size": {"height": 336, "width": 336}, "do_center_crop": True,
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "LlavaNextImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711], "processor_class": "LlavaNextProcessor", "resample": 3,
        "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 336}}
    folder = tmp_path / "hub"
    folder.mkdir()
    (folder / "preprocessor_config.json").write_text(json.dumps(llava_hf))
    loaded = LlavaNextImageProcessor.from_pretrained(folder)
    assert {k: v for k, v in loaded.to_dict().items() if k != "do_pad"} == llava_hf  # extra keys kept
    assert np.array_equal(loaded(CASES["photo-chelsea"][0], return_tensors="np")["pixel_values"],
                          outputs("photo-chelsea")[1]["pixel_values"])


def test_from_pretrained_missing_folder_or_file_names_it(tmp_path):
    with pytest.raises(OSError, match="no_such_checkpoint"):
        LlavaNextImageProcessor.from_pretrained(str(tmp_path / "no_such_checkpoint"))
    with pytest.raises(OSError, match="preprocessor_config.json"):
        LlavaNextImageProcessor.from_pretrained(tmp_path)


# ----- output types -----

def test_image_sizes_stay_exact_integers_after_half_cast():
    out = EXACT(CASES["random-3000x1"][0], return_tensors="pt").to(torch.float16)
    assert out["pixel_values"].dtype == torch.float16
    assert out["image_sizes"].dtype == torch.int64 and out["image_sizes"].tolist() == [[3000, 1]]
    assert out.image_sizes.tolist() == [[3000, 1]]


def test_fast_device_and_tensor_inputs():
    rocket = CASES["torch-chw-uint8"][0]
    out = FAST(rocket, device="cpu")
    assert out["pixel_values"].device.type == "cpu" and out["pixel_values"].dtype == torch.float32
    hwc_float = rocket.permute(1, 2, 0).float() / 255  # float tensors need do_rescale=False, as in transformers
    a = FAST(hwc_float, do_rescale=False)["pixel_values"]
    b = EXACT(hwc_float, do_rescale=False, return_tensors="pt")["pixel_values"]
    assert (a - b).abs().mean() <= FAST_MAD
    raw = FAST(rocket, do_rescale=False, do_normalize=False)["pixel_values"]
    assert raw.dtype == torch.uint8
    assert (raw.float() - EXACT(rocket, do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values"]
            .float()).abs().mean() <= 0.5
    np_out = FAST(rocket, return_tensors="np")
    assert isinstance(np_out["pixel_values"], np.ndarray) and np_out["image_sizes"].dtype == np.int64


def test_fast_output_dtype_and_float_rgba_check_follow_the_exact_processor():
    rng = np.random.default_rng(3)
    raw = dict(do_rescale=False, do_normalize=False, return_tensors="pt")
    whole = rng.integers(0, 256, (40, 50, 3)).astype(np.float32)  # float dtype, 8-bit values
    unit = rng.random((40, 50, 3)).astype(np.float32)
    for image in (whole, unit):
        expected = EXACT(image, **raw)["pixel_values"].dtype
        assert expected == (torch.uint8 if image is whole else torch.float32)
        assert FAST(torch.from_numpy(image), **raw)["pixel_values"].dtype == expected
    rgba = np.concatenate([whole, np.zeros((40, 50, 1), np.float32)], axis=-1)  # 0..255 floats: not an RGBA in [0, 1]
    for processor, image in ((EXACT, rgba), (FAST, torch.from_numpy(rgba))):
        with pytest.raises(ValueError, match="float RGBA image must lie in"):
            processor(image, return_tensors="pt")


def test_in_memory_images_get_the_pixel_limit_before_any_work():
    proc = LlavaNextImageProcessor()
    proc.max_pixels = 10_000
    fast = LlavaNextImageProcessorFast()
    fast.max_pixels = 10_000
    for image in (Image.new("RGB", (200, 100)), np.zeros((3, 100, 200), np.uint8), torch.zeros(100, 200, 3)):
        for p in (proc, fast):
            with pytest.raises(InvalidImageError, match="over the limit"):
                p(image)
    assert EXACT(Image.new("RGB", (200, 100)), return_tensors="pt")["image_sizes"].tolist() == [[100, 200]]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_inf_images_are_refused_by_both_processors(bad):
    image = np.random.default_rng(0).random((3, 20, 20)).astype(np.float32)
    image[1, 5, 5] = bad
    for p in (EXACT, FAST):
        for x in (image, torch.from_numpy(image), np.moveaxis(image, 0, -1)):
            with pytest.raises(InvalidImageError, match="NaN or infinite"):
                p(x)


def test_bad_image_objects_and_dtypes_are_typed_errors():
    for p in (EXACT, FAST):
        for bad in (5, None, {"a": 1}):
            with pytest.raises(InvalidImageError, match="unsupported image type"):
                p(bad)
        for bad in (np.zeros((20, 20, 3), np.complex64), torch.zeros(3, 20, 20, dtype=torch.complex64)):
            with pytest.raises(InvalidImageError, match="complex"):
                p(bad)
        for bad in (np.zeros((0, 10, 3), np.uint8), torch.zeros(3, 0, 10), np.zeros((10, 0)), Image.new("RGB", (0, 5))):
            with pytest.raises(InvalidImageError, match="empty size"):
                p(bad)


def test_bfloat16_tensors_are_read_as_float32():
    x = torch.rand(3, 20, 24)
    x16 = x.bfloat16()
    for p in (EXACT, FAST):
        got = p(x16, do_rescale=False, return_tensors="pt")["pixel_values"]
        assert torch.equal(got, p(x16.float(), do_rescale=False, return_tensors="pt")["pixel_values"])


def test_bad_settings_are_refused_by_name():
    image = np.zeros((20, 20, 3), np.uint8)
    for key, value in (("rescale_factor", "x"), ("rescale_factor", float("nan")), ("image_mean", [float("nan")] * 3),
                       ("image_std", [1.0, float("inf"), 1.0]), ("image_mean", "abc")):
        with pytest.raises(ValueError, match=key):
            EXACT(image, **{key: value})
        with pytest.raises(ValueError, match=key):
            LlavaNextImageProcessor(**{key: value})


def test_fast_processor_refuses_an_unusable_device():
    image = np.zeros((20, 20, 3), np.uint8)
    with pytest.raises(ValueError, match="bogus"):
        FAST(image, device="bogus")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            FAST(image, device="cuda")
    assert FAST(image)["pixel_values"].shape[0] == 1

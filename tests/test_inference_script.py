"""flux_minimal_inference.py run in-process on the tiny models: determinism, PNG text chunks, LoRAs
applied vs merged, Chroma with CFG through the trainer's sampler, interactive prompts, fp8, offload."""

import io
import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

import flux_minimal_inference
from library.errors import UserError
from library.lora_formats import to_ai_toolkit
from library.safetensors_io import load_safetensors, read_metadata, save_safetensors
from library.text_encoders import load_clip_l
from library.tiny_models import TinyModelFiles
from tests.test_merge_lora import write_lora


def argv(models: TinyModelFiles, out: str, *extra, model_type: str = "flux") -> list[str]:
    ckpt = {"flux": models.flux_dev, "schnell": models.flux_schnell, "chroma": models.chroma}[model_type]
    args = [
        "--ckpt_path", ckpt, "--t5xxl", models.t5xxl, "--ae", models.ae, "--tokenizer_cache_dir",
        models.tokenizer_cache_dir, "--t5xxl_max_token_length", "16", "--width", "64", "--height", "80",
        "--steps", "3", "--dtype", "float32", "--output_dir", out, "--device", "cpu",
    ]  # fmt: skip
    if model_type == "chroma":
        args += ["--model_type", "chroma", "--apply_t5_attn_mask"]
    else:
        args += ["--clip_l", models.clip_l]
    return args + [str(e) for e in extra]


def generate(models, tmp_path, name: str, *extra, model_type="flux") -> tuple[np.ndarray, dict[str, str]]:
    """Runs the script into its own folder; returns the image and its PNG text chunks."""
    out = str(tmp_path / name)
    assert flux_minimal_inference.main(argv(models, out, *extra, model_type=model_type)) == 0
    (file,) = os.listdir(out)
    with Image.open(os.path.join(out, file)) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16), dict(image.text)


@pytest.fixture(scope="module")
def lora_file(tiny_model_files, tmp_path_factory):
    """A LoRA on the tiny dev DiT and its CLIP-L, strong enough to change the image visibly."""
    from library.flux_utils import load_flow_model

    _, dit = load_flow_model(tiny_model_files.flux_dev, torch.float32, "cpu")
    clip = load_clip_l(tiny_model_files.clip_l, torch.float32, "cpu")
    path = str(tmp_path_factory.mktemp("inference_lora") / "style.safetensors")
    return write_lora(path, dit, [clip, None], dim=4, alpha=4.0, seed=11, std=0.3)


def test_same_seed_gives_the_same_image_and_the_png_says_how_it_was_made(tiny_model_files, tmp_path, lora_file):
    a, text = generate(tiny_model_files, tmp_path, "a", "--seed", 7, "--prompt", "a red cat", "--lora_weights",
                       f"{lora_file};0.5")  # fmt: skip
    b, _ = generate(tiny_model_files, tmp_path, "b", "--seed", 7, "--prompt", "a red cat", "--lora_weights",
                    f"{lora_file};0.5")  # fmt: skip
    c, _ = generate(tiny_model_files, tmp_path, "c", "--seed", 8, "--prompt", "a red cat", "--lora_weights",
                    f"{lora_file};0.5")  # fmt: skip
    assert a.shape == (80, 64, 3)
    assert np.array_equal(a, b)
    assert np.abs(a - c).max() > 20, "another seed gives another image"
    assert text["prompt"] == "a red cat"
    assert text["seed"] == "7"
    assert text["steps"] == "3"
    assert (text["width"], text["height"], text["guidance"], text["cfg_scale"]) == ("64", "80", "3.5", "1.0")
    assert (text["model"], text["schedule"], text["lora_merged"]) == ("flux1-dev", "shifted", "False")
    assert json.loads(text["loras"]) == [{"name": "style", "multiplier": 0.5}]
    assert "Lora: style:0.5" in text["parameters"]


def test_lora_applied_and_merged_give_the_same_image(tiny_model_files, tmp_path, lora_file):
    base, _ = generate(tiny_model_files, tmp_path, "base", "--seed", 3)
    applied, _ = generate(tiny_model_files, tmp_path, "applied", "--seed", 3, "--lora_weights", f"{lora_file};0.8")
    merged, text = generate(tiny_model_files, tmp_path, "merged", "--seed", 3, "--lora_weights", f"{lora_file};0.8",
                            "--merge_lora_weights")  # fmt: skip
    assert np.abs(applied - base).max() > 20, "the LoRA changes the image"
    assert np.abs(applied - merged).max() <= 1
    assert text["lora_merged"] == "True"


def test_ai_toolkit_lora_gives_the_same_image_as_the_sd_scripts_file(tiny_model_files, tmp_path, lora_file):
    ait = to_ai_toolkit(load_safetensors(lora_file))
    ait_file = str(tmp_path / "style_ait.safetensors")
    save_safetensors(ait.state_dict, ait_file)
    ours, _ = generate(tiny_model_files, tmp_path, "sds", "--seed", 4, "--lora_weights", lora_file)
    theirs, _ = generate(tiny_model_files, tmp_path, "ait", "--seed", 4, "--lora_weights", ait_file)
    assert np.abs(ours - theirs).max() <= 1



def test_a_lora_without_alpha_tensors_applies_at_scale_one(tiny_model_files, tmp_path, lora_file):
    """sd-scripts' rule: a module without alpha has alpha = rank. The fixture's alpha is its rank (4)."""
    weights = load_safetensors(lora_file)
    assert all(v.item() == 4.0 for k, v in weights.items() if k.endswith(".alpha"))
    no_alpha = str(tmp_path / "no_alpha.safetensors")
    save_safetensors({k: v for k, v in weights.items() if not k.endswith(".alpha")}, no_alpha)
    with_alpha, _ = generate(tiny_model_files, tmp_path, "alpha", "--seed", 5, "--lora_weights", lora_file)
    without, _ = generate(tiny_model_files, tmp_path, "no_alpha", "--seed", 5, "--lora_weights", no_alpha)
    assert np.abs(with_alpha - without).max() == 0


def test_chroma_with_cfg_is_the_trainers_sampler(tiny_model_files, tmp_path, caplog):
    from library.flux_sampling import SampleSettings, generate_image, make_encode_prompts
    from library.flux_utils import load_ae, load_flow_model
    from library.text_encoders import FluxTextEncodingStrategy, load_t5xxl
    from library.tokenizers_flux import FluxTokenizeStrategy

    image, text = generate(tiny_model_files, tmp_path, "cfg", "--seed", 5, "--negative_prompt", "blurry",
                           model_type="chroma")  # fmt: skip
    caplog.clear()  # the first run's lines too, where an earlier test left the root logger at INFO
    with caplog.at_level(logging.INFO):
        no_cfg, _ = generate(tiny_model_files, tmp_path, "nocfg", "--seed", 5, "--negative_prompt", "blurry",
                             "--cfg_scale", "1.0", "--clip_l_dtype", "fp16", model_type="chroma")  # fmt: skip
    # there is no CLIP-L: its dtype was taken in silence, and the log line named one
    assert "--clip_l_dtype fp16 is ignored for Chroma, which has no CLIP-L" in caplog.text
    (dtypes,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dtypes: ")]
    assert dtypes.startswith("dtypes: DiT torch.float32, T5 torch.float32, AE")
    assert (text["model"], text["guidance"], text["cfg_scale"], text["negative_prompt"]) == (
        "chroma", "0.0", "4.0", "blurry")  # fmt: skip
    assert np.abs(image - no_cfg).max() > 10, "CFG changes the image"

    _, dit = load_flow_model(tiny_model_files.chroma, torch.float32, "cpu", model_type="chroma")
    ae = load_ae(tiny_model_files.ae, torch.float32, "cpu")
    t5 = load_t5xxl(tiny_model_files.t5xxl, torch.float32, "cpu")
    tokenize = FluxTokenizeStrategy(16, tiny_model_files.tokenizer_cache_dir, use_clip_l=False)
    encode = make_encode_prompts(tokenize, FluxTextEncodingStrategy(True), [None, t5])
    settings = SampleSettings("A photo of a cat", "blurry", 64, 80, 3, 5, guidance=0.0, cfg_scale=4.0)
    reference = generate_image(dit, ae, settings, encode_prompts=encode, model_type="chroma", dtype=torch.float32)
    assert np.abs(image - np.asarray(reference).astype(np.int16)).max() <= 1


def test_a_lora_checked_before_loading_warns_once_about_modules_without_target(tiny_model_files, tmp_path,
                                                                               lora_file, caplog):  # fmt: skip
    """The LoRAs are checked against the models' headers before the models load, then built again on the loaded
    models: what building one warns about is said once."""
    extra = str(tmp_path / "extra.safetensors")
    save_safetensors({**load_safetensors(lora_file), "lora_unet_gone.lora_down.weight": torch.ones(4, 8),
                      "lora_unet_gone.lora_up.weight": torch.ones(8, 4)}, extra)  # fmt: skip
    with caplog.at_level(logging.WARNING):
        generate(tiny_model_files, tmp_path, "extra", "--lora_weights", extra)
    assert [m for m in caplog.messages if "have no target" in m] == [
        f"{extra}: 1 LoRA modules have no target and are ignored, e.g. ['lora_unet_gone']"
    ]


def test_a_lora_of_another_base_model_is_named(tiny_model_files, tmp_path, lora_file, caplog):
    chroma = str(tmp_path / "chroma_labelled.safetensors")
    metadata = {**read_metadata(lora_file), "ss_base_model_version": "chroma"}
    save_safetensors(load_safetensors(lora_file), chroma, metadata)
    with caplog.at_level(logging.WARNING):
        generate(tiny_model_files, tmp_path, "other", "--lora_weights", chroma)
    assert f"--lora_weights {chroma} was trained on chroma (ss_base_model_version), and this model is flux1" in (
        caplog.messages)
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # and the other way: a FLUX.1 LoRA on Chroma
        generate(tiny_model_files, tmp_path, "other_way", "--lora_weights", lora_file, model_type="chroma")
    assert f"--lora_weights {lora_file} was trained on flux1 (ss_base_model_version), and this model is chroma" in (
        caplog.messages)
    assert "--clip_l_dtype" not in caplog.text  # not given: nothing to say about it


def test_interactive_prompts_from_stdin(tiny_model_files, tmp_path, lora_file, monkeypatch, capsys):
    lines = [
        "a cat --w 80 --h 64 --s 2 --d 3 --m 0.25",
        "a dog --d 4 --n blurry --l 2.5",
        "a tree --d 4 --s x",  # a bad value: reported, then the next line is read
        "a tree --d 18446744073709551616",  # a seed past 64 bits: reported too
        "a house --d 5 --c 1.0 --n - --m 1,2",  # two multipliers for one LoRA: reported
        "a house --d 5 --g 1.5",
        "a bird",  # no --d: --seed (it was a random seed each line)
        "a fox --d -7",  # any seed --seed takes (the prompt files' 0 or more refused it)
        "--w 96 --d 6",  # options only: an empty prompt, as in sd-scripts (the line was taken as the prompt)
        "",
        "never read",
    ]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    out = str(tmp_path / "interactive")
    args = argv(tiny_model_files, out, "--interactive", "--lora_weights", lora_file, "--negative_prompt", "ugly",
                "--seed", "11")  # fmt: skip
    assert flux_minimal_inference.main(args) == 0
    texts = []
    for file in sorted(os.listdir(out)):
        with Image.open(os.path.join(out, file)) as image:
            texts.append(dict(image.text))
    texts.sort(key=lambda t: (int(t["seed"]), t["prompt"]))
    shown = [(t["prompt"], t["seed"], t["width"], t["height"], t["steps"], t["negative_prompt"], t["cfg_scale"],
              t["guidance"], json.loads(t["loras"])[0]["multiplier"]) for t in texts]  # fmt: skip
    assert shown == [
        ("a fox", "-7", "80", "64", "2", "ugly", "2.5", "1.5", 0.25),
        ("a cat", "3", "80", "64", "2", "ugly", "1.0", "3.5", 0.25),
        ("a dog", "4", "80", "64", "2", "blurry", "2.5", "3.5", 0.25),
        ("a house", "5", "80", "64", "2", "ugly", "2.5", "1.5", 0.25),
        ("", "6", "96", "64", "2", "ugly", "2.5", "1.5", 0.25),
        ("a bird", "11", "80", "64", "2", "ugly", "2.5", "1.5", 0.25),
    ]
    printed = capsys.readouterr().out
    assert "error: interactive prompt: --s needs a whole number" in printed
    assert "error: --d 18446744073709551616: a seed is a whole number from -2**63 to 2**64 - 1" in printed
    assert "error: --m: 2 multipliers given for 1 LoRAs" in printed


def test_fp8_dit_and_text_encoders_compute_in_the_compute_dtype(tiny_model_files, tmp_path, lora_file):
    args = flux_minimal_inference.setup_parser().parse_args(
        argv(
            tiny_model_files,
            str(tmp_path / "p"),
            "--flux_dtype",
            "fp8",
            "--t5xxl_dtype",
            "fp8_e4m3fn",
            "--clip_l_dtype",
            "fp8",
            "--lora_weights",
            lora_file,
        )  # fmt: skip
    )
    pipeline = flux_minimal_inference.load_pipeline(args)
    block_weights = {
        m.weight.dtype for b in pipeline.dit.double_blocks for m in b.modules() if isinstance(m, torch.nn.Linear)
    }
    assert block_weights == {torch.float8_e4m3fn}
    assert pipeline.dit.img_in.weight.dtype == torch.float32
    assert pipeline.text_encoders[1].encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.float8_e4m3fn

    full, _ = generate(tiny_model_files, tmp_path, "fp32", "--seed", 2, "--lora_weights", lora_file)
    fp8, _ = generate(tiny_model_files, tmp_path, "fp8", "--seed", 2, "--lora_weights", lora_file, "--flux_dtype",
                      "fp8", "--t5xxl_dtype", "fp8", "--clip_l_dtype", "fp8")  # fmt: skip
    difference = np.abs(full - fp8)
    assert difference.mean() < 8, "fp8 weights change the image only a little"
    assert difference.max() > 0, "the weights really were fp8"



@pytest.mark.parametrize("extra, narrow", [((), True), (("--merge_lora_weights",), False),
                                           (("--flux_dtype", "fp8_e5m2"), False)])  # fmt: skip
def test_an_fp8_dit_is_stored_in_fp8_as_it_is_read(tiny_model_files, tmp_path, lora_file, monkeypatch, extra, narrow):
    """The whole DiT was read in the compute dtype (twice an fp8 file's size in bf16) and only then cast; a merged
    LoRA and e5m2 storage still need the wide weights first."""
    from library import flux_utils

    calls = []
    load = flux_utils.load_flow_model
    monkeypatch.setattr(flux_utils, "load_flow_model", lambda *a, **k: calls.append(k) or load(*a, **k))
    args = argv(tiny_model_files, str(tmp_path / "p"), "--flux_dtype", "fp8", "--lora_weights", lora_file, *extra)
    pipeline = flux_minimal_inference.load_pipeline(flux_minimal_inference.setup_parser().parse_args(args))
    assert [c["fp8_block_linears"] for c in calls] == [narrow]
    stored = {m.weight.dtype for b in pipeline.dit.single_blocks for m in b.modules() if isinstance(m, torch.nn.Linear)}
    assert stored == {torch.float8_e5m2 if "fp8_e5m2" in extra else torch.float8_e4m3fn}


def test_a_lora_merged_into_fp8_text_encoders_goes_into_their_wide_weights(tiny_model_files, tmp_path, lora_file):
    """--merge_lora_weights with an fp8 CLIP-L / T5: Q(W + dW), as the DiT gets, not Q(Q(W) + dW)."""
    from library.fp8 import store_linears_in_fp8
    from library.text_encoders import load_clip_l
    from networks.lora_flux import create_network_from_weights

    extra = ("--lora_weights", lora_file, "--merge_lora_weights", "--clip_l_dtype", "fp8", "--t5xxl_dtype", "fp8")
    pipeline = flux_minimal_inference.load_pipeline(
        flux_minimal_inference.setup_parser().parse_args(argv(tiny_model_files, str(tmp_path / "p"), *extra)))
    from library.flux_utils import load_flow_model

    _, dit = load_flow_model(tiny_model_files.flux_dev, torch.float32, "cpu")
    clip = load_clip_l(tiny_model_files.clip_l, torch.float32, "cpu")
    network, weights = create_network_from_weights(1.0, lora_file, None, [clip, None], dit, for_inference=True)
    network.merge_to([clip, None], dit, weights)
    expected = store_linears_in_fp8(clip).state_dict()
    got = pipeline.text_encoders[0].state_dict()
    assert got["encoder.layers.0.mlp.fc1.weight"].dtype == torch.float8_e4m3fn
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key



def test_a_dit_dtype_other_than_the_text_encoders_samples_in_the_dits(tiny_model_files, tmp_path):
    """--dtype float32 --flux_dtype bfloat16 (fp32 encoders and AE, a bf16 DiT): the sampler feeds the DiT bf16."""
    image, text = generate(tiny_model_files, tmp_path, "mixed", "--seed", 6, "--dtype", "float32",
                           "--flux_dtype", "bfloat16")  # fmt: skip
    wide, _ = generate(tiny_model_files, tmp_path, "wide", "--seed", 6)
    assert text["seed"] == "6" and 0 < np.abs(image - wide).mean() < 8  # bf16 rounding, the same picture


def test_offload_gives_the_same_image(tiny_model_files, tmp_path, lora_file):
    a, _ = generate(tiny_model_files, tmp_path, "a", "--seed", 9, "--lora_weights", lora_file)
    b, _ = generate(tiny_model_files, tmp_path, "b", "--seed", 9, "--lora_weights", lora_file, "--offload")
    assert np.array_equal(a, b)


def test_schnell_defaults_to_four_linear_steps(tiny_model_files, tmp_path):
    out = str(tmp_path / "s")
    args = [a for a in argv(tiny_model_files, out, "--seed", 1, model_type="schnell")]
    i = args.index("--steps")
    del args[i : i + 2]
    assert flux_minimal_inference.main(args) == 0
    (file,) = os.listdir(out)
    with Image.open(os.path.join(out, file)) as image:
        assert (image.text["steps"], image.text["schedule"], image.text["model"]) == ("4", "linear", "flux1-schnell")


@pytest.mark.parametrize(
    "extra, model_type, message",
    [
        ([], "chroma-no-mask", "--model_type chroma needs --apply_t5_attn_mask"),
        (["--lora_weights", "missing.safetensors;0.5"], "flux", "--lora_weights missing.safetensors: file not found"),
        (["--lora_weights", "{lora};strong"], "flux", "the multiplier after ';' must be a number"),
        (["--flux_dtype", "fp4"], "flux", "--flux_dtype fp4: expected one of"),
        (["--ckpt_path", "{chroma}"], "flux", "is a Chroma model: add --model_type chroma"),
        (["--height", "48"], "flux", "--width 64 / --height 48: the image must be at least 64 pixels a side"),
        (["--device", "gpu0"], "flux", "--device gpu0: not a device name"),
        (["--seed", "18446744073709551616"], "flux", "--seed 18446744073709551616: a seed is a whole number from"),
        (["--t5xxl_max_token_length", "0"], "flux", "--t5xxl_max_token_length 0: give 1 or more"),
        (["--steps", "0"], "flux", "--steps 0: at least 1 step is needed"),  # (0 would mean the default)
        (["--cfg_scale", "inf"], "flux", "--cfg_scale inf: give a finite number"),  # a black image, before
        (["--guidance", "nan"], "flux", "--guidance nan: give a finite number"),
        # found after the models had loaded and the image was made: the image was lost
        (["--output_dir", "{lora}/x"], "flux", "--output_dir {lora}/x: {lora} is a file, not a folder"),
        (["--lora_weights", "{truncated}"], "flux", "--lora_weights {truncated}: not a .safetensors file"),
        (["--lora_weights", "{text}"], "flux", "--lora_weights {text}: not a LoRA file: neither .safetensors nor"),
        (["--lora_weights", "{list_pt}"], "flux", "--lora_weights {list_pt}: holds a list, not a LoRA state dict"),
        (["--lora_weights", "{dict_pt}"], "flux", "--lora_weights {dict_pt}: holds a dict, not a LoRA state dict"),
        (["--tokenizer_cache_dir", "{tmp}/no_tokenizers"], "flux", "Could not load the tokenizer"),
        # found after the DiT, CLIP-L, T5 and the AE had loaded (minutes with the real files): now from the headers
        (["--lora_weights", "{damaged}"], "flux", "--lora_weights {damaged}: module "
                                                  "lora_unet_double_blocks_0_img_attn_proj is damaged: its down is "
                                                  "(4, 64) and its up (64, 3)"),
        (["--lora_weights", "{wide}"], "flux", "--lora_weights {wide} does not fit this network: "
                                               "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight (4, 96) "
                                               "(network (4, 64)). The LoRA was made for a model of other widths"),
        (["--lora_weights", "{sdxl}"], "flux", "--lora_weights {sdxl}: none of its 1 LoRA modules (e.g. "
                                               "lora_unet_input_blocks_1_1_proj_in) exists in the models given"),
        # the checks' messages named the trainer's flags (--pretrained_model_name_or_path, --fp8_base)
        (["--ae", "{dev}"], "flux", "a FLUX DiT (the main model: --ckpt_path)"),
        (["--ckpt_path", "{int8}"], "flux", "--ckpt_path {int8}: double_blocks.0.img_attn.qkv.weight is stored as "
                                            "I8: an int8 or 4-bit quantized file (bitsandbytes, NF4), which this "
                                            "trainer does not read; give a bf16, fp16 or fp8 file (--flux_dtype fp8 "
                                            "quantizes on load)"),
    ],
)
def test_user_errors_are_one_line(tiny_model_files, tmp_path, lora_file, capsys, monkeypatch, extra, model_type,
                                  message):  # fmt: skip
    import huggingface_hub.constants

    import library.flux_utils

    def refuse(*args, **kwargs):
        raise AssertionError("the models loaded before the error")

    if not model_type.endswith("-loading"):  # errors found before the models load
        monkeypatch.setattr(library.flux_utils, "load_flow_model", refuse)
    files = {"lora": lora_file, "chroma": tiny_model_files.chroma, "truncated": tmp_path / "t.safetensors",
             "text": tmp_path / "notes.txt", "list_pt": tmp_path / "list.pt", "damaged": tmp_path / "d.safetensors",
             "dict_pt": tmp_path / "dict.pt", "tmp": tmp_path, "wide": tmp_path / "w.safetensors",
             "sdxl": tmp_path / "sdxl.safetensors", "dev": tiny_model_files.flux_dev,
             "int8": tmp_path / "i8.safetensors"}
    dit = load_safetensors(tiny_model_files.flux_dev)
    dit["double_blocks.0.img_attn.qkv.weight"] = dit["double_blocks.0.img_attn.qkv.weight"].to(torch.int8)
    save_safetensors(dit, files["int8"])
    # no network retries for the tokenizer that is not there (4 minutes here): huggingface_hub reads the
    # variable when it is imported, so its constant is set too
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    weights = load_safetensors(lora_file)  # lora_up's rank is not lora_down's: it was "made for other widths"
    weights["lora_unet_double_blocks_0_img_attn_proj.lora_up.weight"] = torch.ones(64, 3)
    save_safetensors(weights, files["damaged"])
    weights = load_safetensors(lora_file)  # for a DiT 96 wide
    weights["lora_unet_double_blocks_0_img_attn_proj.lora_down.weight"] = torch.ones(4, 96)
    save_safetensors(weights, files["wide"])
    save_safetensors({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.ones(4, 320),
                      "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.ones(320, 4)}, files["sdxl"])
    with open(lora_file, "rb") as f:
        (tmp_path / "t.safetensors").write_bytes(f.read()[:6])
    (tmp_path / "notes.txt").write_text("a LoRA? no")
    torch.save([torch.ones(2)], tmp_path / "list.pt")
    torch.save({"epoch": 3, "lora_unet_x.lora_down.weight": torch.ones(2, 2)}, tmp_path / "dict.pt")  # a training save
    extra = [e.format(**files) for e in extra]
    message = message.format(**files)
    args = argv(tiny_model_files, str(tmp_path / "x"), *extra, model_type=model_type.split("-")[0])
    if model_type == "chroma-no-mask":
        args.remove("--apply_t5_attn_mask")
    assert flux_minimal_inference.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert not os.path.exists(tmp_path / "x")


def test_weights_no_module_takes_are_named(tiny_model_files, tmp_path, lora_file, caplog):
    """ComfyUI applies bias diffs (.diff_b) and full diffs (.diff) some LoRA files carry; no module here takes them,
    and they were dropped without a word."""
    weights = load_safetensors(lora_file)
    weights["lora_unet_double_blocks_0_img_attn_proj.diff_b"] = torch.ones(64)
    weights["lora_unet_final_layer_linear.diff"] = torch.ones(16, 64)
    path = str(tmp_path / "diffs.safetensors")
    save_safetensors(weights, path)
    for mode in ([], ["--merge_lora_weights"]):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            with_diffs, _ = generate(tiny_model_files, tmp_path, f"diffs{len(mode)}", "--seed", 3,
                                     "--lora_weights", path, *mode)  # fmt: skip
        assert (f"{path}: 2 weights have no module here and are ignored: lora_unet_double_blocks_0_img_attn_proj"
                ".diff_b, lora_unet_final_layer_linear.diff") in caplog.messages
        plain, _ = generate(tiny_model_files, tmp_path, f"plain{len(mode)}", "--seed", 3, "--lora_weights", lora_file,
                            *mode)  # fmt: skip
        assert np.array_equal(with_diffs, plain)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        generate(tiny_model_files, tmp_path, "clean", "--seed", 3, "--lora_weights", lora_file)
    assert not any("no module here" in m for m in caplog.messages)


def test_a_lora_file_with_a_semicolon_in_its_name_is_that_file(tmp_path):
    odd = tmp_path / "style;v2.safetensors"
    odd.write_bytes(b"")
    assert flux_minimal_inference.parse_lora_spec(str(odd)) == (str(odd), 1.0)
    assert flux_minimal_inference.parse_lora_spec(f"{odd};0.5") == (str(odd), 0.5)
    assert flux_minimal_inference.parse_lora_spec(f"{tmp_path}/a.safetensors;-1") == (f"{tmp_path}/a.safetensors", -1.0)
    with pytest.raises(UserError, match=r"v3\.safetensors: the multiplier after ';' must be a number"):
        flux_minimal_inference.parse_lora_spec(str(tmp_path / "style;v3.safetensors"))


def test_a_negative_seed_is_a_seed(tiny_model_files, tmp_path):
    """torch takes seeds from -2**63 (sd-scripts too): -1 is the same noise as 2**64 - 1."""
    negative, text = generate(tiny_model_files, tmp_path, "neg", "--seed", -1)
    wrapped, _ = generate(tiny_model_files, tmp_path, "wrapped", "--seed", 2**64 - 1)
    assert text["seed"] == "-1" and np.array_equal(negative, wrapped)


def test_sizes_are_floored_to_multiples_of_16(tiny_model_files, tmp_path):
    """--width 100 --height 90 draws at 96x80 (what sd-scripts' sampler does), not a resized 96x80 picture."""
    floored, text = generate(tiny_model_files, tmp_path, "odd", "--seed", 2, "--width", 100, "--height", 90)
    exact, _ = generate(tiny_model_files, tmp_path, "exact", "--seed", 2, "--width", 96, "--height", 80)
    assert floored.shape == (80, 96, 3) and (text["width"], text["height"]) == ("96", "80")
    assert "Size: 96x80," in text["parameters"]
    assert np.array_equal(floored, exact)


@pytest.fixture(scope="module")
def chroma_lora_file(tiny_model_files, tmp_path_factory):
    """A LoRA on the tiny Chroma DiT, strong enough to change the image visibly."""
    from library.flux_utils import load_flow_model

    _, dit = load_flow_model(tiny_model_files.chroma, torch.float32, "cpu", model_type="chroma")
    path = str(tmp_path_factory.mktemp("inference_chroma_lora") / "chroma_style.safetensors")
    return write_lora(path, dit, [None, None], dim=4, alpha=4.0, seed=11, std=0.3)


def test_chroma_png_records_the_applied_lora_and_two_halves_equal_the_whole(tiny_model_files, tmp_path,
                                                                             chroma_lora_file):
    def chroma(name, *extra):
        return generate(tiny_model_files, tmp_path, name, "--seed", 1, *extra, model_type="chroma")

    base, _ = chroma("base")
    applied, text = chroma("applied", "--lora_weights", f"{chroma_lora_file};0.7")
    assert np.abs(applied - base).max() > 20, "the LoRA changes the image"
    assert json.loads(text["loras"]) == [{"name": "chroma_style", "multiplier": 0.7}]
    assert text["lora_merged"] == "False" and text["model"] == "chroma"
    assert text["parameters"].endswith(", Model: chroma, Lora: chroma_style:0.7")

    copy = str(tmp_path / "copy.safetensors")
    save_safetensors(load_safetensors(chroma_lora_file), copy)
    whole, _ = chroma("whole", "--lora_weights", chroma_lora_file)
    halves, text = chroma("halves", "--lora_weights", f"{chroma_lora_file};0.5", f"{copy};0.5")
    assert text["parameters"].endswith(", Lora: chroma_style:0.5, Lora: copy:0.5")
    assert np.abs(whole - halves).max() <= 1 and np.abs(whole - applied).max() > 5

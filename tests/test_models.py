"""Model library: DCFormer, projector, sigmoid loss (world size 1 == 2), VLM splice/labels/generation, LoRA, I/O."""

import copy
import math
import os
import socket
import warnings

import pytest
import torch
import torch.nn.functional as F

from med3dvlm.config import LossConfig, load_config
from med3dvlm.models.clip import CLIPModel, SigLipLoss
from med3dvlm.models.convert import to_released
from med3dvlm.models.dcformer import DecompConv3d, build_dcformer
from med3dvlm.models.projector import DualStreamProjector, projector_config_for
from med3dvlm.models.vlm import VLM

REFERENCE_COUNTS = {"nano": 0.789, "naive": 5.852, "tiny": 14.657, "small": 18.245, "base": 33.869, "large": 185.125}


@pytest.mark.parametrize("variant", list(REFERENCE_COUNTS))
def test_dcformer_parameter_counts_match_the_reference(variant):
    m = build_dcformer(variant)
    assert round(m.num_params() / 1e6, 3) == REFERENCE_COUNTS[variant]
    assert not any(n.endswith(("gamma", "beta")) for n, _ in m.named_parameters())


def test_dcformer_small_paper_shapes_on_meta():
    with torch.device("meta"):
        m = build_dcformer("small")
        out = m(torch.zeros(1, 1, 128, 256, 256))
    assert [tuple(o.shape[1:]) for o in out] == [(131072, 64), (16384, 96), (2048, 192), (256, 384), (32, 768)]
    assert [g[0] * g[1] * g[2] for g in m.grid((128, 256, 256))] == [o.shape[1] for o in out]


def test_dcformer_token_order_is_depth_major_and_flops_are_exact():
    from torch.utils.flop_counter import FlopCounterMode

    m = build_dcformer("nano").eval()
    x = torch.rand(1, 1, 64, 64, 128)
    with FlopCounterMode(display=False) as fc:
        out = m(x)
    assert fc.get_total_flops() == m.estimate_flops((64, 64, 128))
    # stage-4 grid for (64, 64, 128) is (1, 1, 2): tokens must run along W last
    assert m.grid((64, 64, 128))[-1] == (1, 1, 2) and out[-1].shape[1] == 2
    # a perturbation confined to the last W half changes only the second token more than the first
    y = x.clone()
    y[..., 96:] += 1.0
    d = (m(y)[-1] - out[-1]).abs().sum(-1)[0]
    assert d[1] > d[0]


def test_stem_activation_switch():
    a, b = build_dcformer("nano"), build_dcformer("nano", stem_act=True)
    assert a.num_params() == b.num_params()
    assert isinstance(b.stem[0].act, torch.nn.GELU) and isinstance(a.stem[0].act, torch.nn.Identity)


@pytest.mark.parametrize("groups", [6, 1])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_axis_convolution_equals_conv3d_forward_and_backward(axis, layout, groups):
    """The 1-D convolution runs on CPU as a 2-D convolution on a view (depthwise from either layout; dense along H or
    W from channels-last): the same sums as torch's Conv3d with the same weights, values and gradients (float64,
    batch 2, a kernel longer than the axis)."""
    from med3dvlm.models.dcformer import AxisConv3d

    torch.manual_seed(axis)
    conv = AxisConv3d(6, 6, 5, axis, groups=groups).double()
    x = torch.randn(2, 6, 3, 4, 7, dtype=torch.float64).contiguous(memory_format=layout).requires_grad_()
    assert x.is_contiguous(memory_format=layout) and not x.is_contiguous(memory_format=torch.channels_last_3d
                                                                        if layout == torch.contiguous_format
                                                                        else torch.contiguous_format)
    x3 = x.detach().clone().requires_grad_()
    w3 = conv.weight.detach().clone().requires_grad_()
    b3 = conv.bias.detach().clone().requires_grad_()
    g = torch.randn(2, 6, 3, 4, 7, dtype=torch.float64)
    conv(x).backward(g)
    F.conv3d(x3, w3, b3, padding=conv.padding, groups=groups).backward(g)
    assert conv(x).shape == x.shape
    torch.testing.assert_close(conv(x), F.conv3d(x3, w3, b3, padding=conv.padding, groups=groups), rtol=0, atol=1e-12)
    for ours, theirs in ((x.grad, x3.grad), (conv.weight.grad, w3.grad), (conv.bias.grad, b3.grad)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_the_one_channel_first_layer_equals_conv3d_forward_and_backward(axis):
    """The stem's first layer (one input channel, k 7, stride 4) runs on CPU as a matmul of each output position's
    taps: torch's Conv3d values and gradients (input, weight, bias), its output shape on sizes that are not multiples
    of the stride, and a channels-last output."""
    from med3dvlm.models.dcformer import AxisConv3d

    torch.manual_seed(axis)
    conv = AxisConv3d(1, 5, 7, axis, stride=4).double()
    x = torch.randn(2, 1, 9, 10, 13, dtype=torch.float64, requires_grad=True)
    x3, w3, b3 = (t.detach().clone().requires_grad_() for t in (x, conv.weight, conv.bias))
    theirs = F.conv3d(x3, w3, b3, stride=4, padding=conv.padding)
    ours = conv(x)
    assert ours.shape == theirs.shape == (2, 5, 3, 3, 4)
    assert ours.is_contiguous(memory_format=torch.channels_last_3d)
    g = torch.randn(theirs.shape, dtype=torch.float64)
    ours.backward(g)
    theirs.backward(g)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    for a, b in ((x.grad, x3.grad), (conv.weight.grad, w3.grad), (conv.bias.grad, b3.grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
def test_the_downsampling_pool_gives_torchs_values_and_gradients(layout):
    """The pool that hands its gradient back channels-last is still MaxPool3d: same output and input gradient, with
    a plain gradient arriving from the 1x1x1 convolution after it, as in a ConvBlock."""
    from med3dvlm.models.dcformer import MaxPool

    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 10, 10, dtype=torch.float64).contiguous(memory_format=layout)
    conv = torch.nn.Conv3d(8, 4, 1, bias=False).double()
    grads = []
    for pool in (MaxPool(3, 2, 1), torch.nn.MaxPool3d(3, 2, 1)):
        xi = x.detach().clone().requires_grad_()
        y = pool(xi)
        conv(y).square().sum().backward()
        grads.append((y.detach(), xi.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=0)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=0, atol=0)


def test_projector_paper_count_and_shape_on_meta():
    enc = build_dcformer("small")
    cfg = projector_config_for(enc, (128, 256, 256), 3584, 256)
    assert (cfg.low_tokens, cfg.low_channels, cfg.high_tokens, cfg.high_channels) == (256, 384, 32, 768)
    with torch.device("meta"):
        p = DualStreamProjector(cfg)
        y = p(torch.zeros(2, 256, 384), torch.zeros(2, 32, 768))
    assert round(p.num_params() / 1e6, 3) == 47.221 and tuple(y.shape) == (2, 256, 3584)
    assert [l.token_mlp[0].out_features for l in p.low] == [192, 128]
    assert [l.token_mlp[0].out_features for l in p.high] == [64, 128]


def test_projector_shapes_derive_from_config():
    enc = build_dcformer("nano")
    p = DualStreamProjector(projector_config_for(enc, (32, 64, 64), 64, 8))
    feats = enc(torch.rand(2, 1, 32, 64, 64))
    assert tuple(p(feats[-2], feats[-1]).shape) == (2, 8, 64)
    with pytest.raises(ValueError, match="divisible"):
        projector_config_for(enc, (32, 64, 64), 63, 8)


def reference_sigmoid_loss(img, txt, t_prime, b, symmetric):
    n = img.shape[0]
    loss = 0.0
    for i in range(n):
        for j in range(n):
            lij = math.exp(t_prime) * float(img[i] @ txt[j]) + b
            lji = math.exp(t_prime) * float(img[j] @ txt[i]) + b
            logit = (lij + lji) / 2 if symmetric else lij
            z = 1.0 if i == j else -1.0
            loss -= math.log(1 / (1 + math.exp(-z * logit)))
    return loss / n


@pytest.mark.parametrize("symmetric,t,b", [(True, math.log(1 / 0.07), 0.0), (False, math.log(10), -10.0)])
def test_sigmoid_loss_equals_the_formula(symmetric, t, b):
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    loss = SigLipLoss(LossConfig(t_init=t, b_init=b, symmetric=symmetric))(img, txt)
    assert loss.item() == pytest.approx(reference_sigmoid_loss(img, txt, t, b, symmetric), rel=1e-5)


def test_temperature_clamp_and_learnability():
    loss = SigLipLoss(LossConfig(t_init=5.0, t_max=math.log(100), learn_b=False))
    assert loss.temperature.item() == pytest.approx(100.0)
    assert loss.t_prime.requires_grad and not loss.bias.requires_grad


def _tiny_clip_pair():
    torch.manual_seed(0)
    lin = torch.nn.Linear(12, 8)
    x = torch.randn(8, 12)
    y = torch.randn(8, 8)
    return lin, x, y


def _worker(rank, world, port, q):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    lin, x, y = _tiny_clip_pair()
    loss_fn = SigLipLoss(LossConfig())
    n = x.shape[0] // world
    sl = slice(rank * n, (rank + 1) * n)
    img = F.normalize(lin(x[sl]), dim=-1)
    txt = F.normalize(y[sl], dim=-1)
    loss = loss_fn(img, txt)
    loss.backward()
    grads = [lin.weight.grad, lin.bias.grad, loss_fn.t_prime.grad, loss_fn.bias.grad]
    for g in grads:  # what DDP/DeepSpeed do: average gradients over ranks
        dist.all_reduce(g)
        g /= world
    if rank == 0:
        q.put((loss.item(), [g.tolist() for g in grads]))
    dist.destroy_process_group()


def test_loss_and_gradients_equal_for_world_size_1_and_2():
    import torch.multiprocessing as mp

    lin, x, y = _tiny_clip_pair()
    loss_fn = SigLipLoss(LossConfig())
    loss = loss_fn(F.normalize(lin(x), dim=-1), F.normalize(y, dim=-1))
    loss.backward()
    ref = [lin.weight.grad, lin.bias.grad, loss_fn.t_prime.grad, loss_fn.bias.grad]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    loss2, grads2 = q.get(timeout=120)
    for p in procs:
        p.join(60)
    assert loss2 == pytest.approx(loss.item(), rel=1e-6)
    for a, b in zip(ref, grads2):
        assert torch.allclose(a, torch.tensor(b), atol=1e-6)


# ---------------------------------------------------------------- VLM

@pytest.fixture(scope="module")
def tiny():
    return load_config("tiny")


@pytest.fixture(scope="module")
def vlm(tiny):
    torch.manual_seed(0)
    return VLM.from_config(tiny.model, tiny.data.shape).eval()


def test_labels_mask_prompt_and_padding_and_end_with_eos(vlm):
    ids, labels = vlm.encode_example(" Which organ?", " Liver")
    n = vlm.cfg.image_tokens
    prompt = vlm.tokenizer(" Which organ?", add_special_tokens=False)["input_ids"]
    answer = vlm.tokenizer(" Liver", add_special_tokens=False)["input_ids"]
    assert ids == [vlm.image_token_id] * n + prompt + answer + [vlm.tokenizer.eos_token_id]
    assert labels == [-100] * (n + len(prompt)) + answer + [vlm.tokenizer.eos_token_id]
    batch = vlm.collate([(ids, labels), vlm.encode_example(" Which organ is shown in this scan?", " Kidney")])
    short = batch["attention_mask"][0] == 0
    assert short.any() and (batch["labels"][0][short] == -100).all()


def test_long_answer_is_cut_without_eos(vlm):
    ids, labels = vlm.encode_example(" Describe.", " word" * 500)
    assert len(ids) == vlm.cfg.max_len and labels[-1] != vlm.tokenizer.eos_token_id


@pytest.mark.parametrize("mode", ["exact", "m3d_legacy"])
def test_splice_positions(tiny, mode):
    from dataclasses import replace

    m = VLM.from_config(replace(tiny.model, splice=mode), tiny.data.shape).eval()
    n = m.cfg.image_tokens
    ids, _ = m.encode_example(" Which organ?", None)
    ids_t = torch.tensor([ids])
    img = torch.randn(1, n, m.llm.config.hidden_size)
    emb = m.embed(ids_t, img)
    table = m.llm.get_input_embeddings()(ids_t)
    if mode == "exact":
        assert torch.equal(emb[0, :n], img[0]) and torch.equal(emb[0, n:], table[0, n:])
    else:  # first placeholder kept, image at 1..n, the first text token (position n) overwritten
        assert torch.equal(emb[0, 0], table[0, 0]) and torch.equal(emb[0, 1:n + 1], img[0])
        assert torch.equal(emb[0, n + 1:], table[0, n + 1:])


def test_batched_generation_equals_one_by_one(vlm, tiny):
    torch.manual_seed(1)
    vols = torch.rand(3, 1, *tiny.data.shape)
    prompts = [" Which organ?", "Describe the findings of the medical image you see.", " Where is it?"]
    batched = vlm.generate(vols, prompts, max_new_tokens=6)
    single = [vlm.generate(vols[i:i + 1], [p], max_new_tokens=6)[0] for i, p in enumerate(prompts)]
    assert batched == single and all(batched)


def _lora_params(llm, r):
    return sum(r * (m.in_features + m.out_features) for n, m in llm.named_modules()
               if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in
               ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))


@pytest.mark.parametrize("preset", ["paper", "released_code", "full"])
def test_trainable_parameters_per_stage_and_preset(tiny, preset):
    from dataclasses import replace

    m = VLM.from_config(replace(tiny.model, trainable=preset), tiny.data.shape)
    proj = m.projector.num_params()
    emb = m.llm.get_input_embeddings().weight.numel()
    lora = _lora_params(m.llm, tiny.model.lora_r)
    llm = m.llm.num_parameters()
    m.set_stage(2)
    assert m.num_params(trainable=True) == proj + {"paper": 0, "released_code": emb, "full": llm}[preset]
    with warnings.catch_warnings(record=True) as seen:  # adding LoRA: peft's deprecated read caught at its call
        warnings.simplefilter("always")
        m.set_stage(3)
    assert not [w.message for w in seen if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert m.lora == (preset != "full")
    expected = (llm if preset == "full" else lora) + proj
    if preset == "released_code":
        expected += emb + m.llm.get_output_embeddings().weight.numel() + m.vision.num_params()
    assert m.num_params(trainable=True) == expected
    m.train()
    assert m.vision.training == (preset == "released_code")


def test_vlm_save_load_round_trip(tiny, tmp_path):
    from dataclasses import replace

    vlm = VLM.from_config(replace(tiny.model, trainable="paper"), tiny.data.shape).eval()
    vlm.set_stage(3)
    with torch.no_grad():
        for n, p in vlm.llm.named_parameters():
            if "lora_B" in n:
                p.normal_()  # LoRA B starts at zero; make the adapter matter
    vlm.save_pretrained(tmp_path / "v")
    again = VLM.from_pretrained(tmp_path / "v").eval()
    x = torch.rand(2, 1, *tiny.data.shape)
    batch = vlm.collate([vlm.encode_example(" Which organ?", " Liver")] * 2)
    assert torch.equal(vlm.eval()(x, **batch).loss, again(x, **batch).loss)
    del batch["labels"]
    assert torch.equal(vlm(x, **batch).logits, again(x, **batch).logits)


def test_answer_only_loss_equals_the_full_lm_loss(vlm, tiny):
    x = torch.rand(2, 1, *tiny.data.shape)
    batch = vlm.collate([vlm.encode_example(" Which organ?", " Liver"), vlm.encode_example(" Describe.", " A small lesion.")])
    ours = vlm(x, **batch).loss
    emb = vlm.embed(batch["input_ids"], vlm.encode_images(x))
    full = vlm.llm(inputs_embeds=emb, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert torch.allclose(ours, full, atol=1e-5)


def test_trimmed_padding_leaves_the_losses_and_text_embeddings_unchanged(vlm, tiny):
    """The training step cuts the feed's max_len padding after the batch's longest row: same outputs, less compute."""
    import numpy as np

    from med3dvlm.data.samples import tokenize_reports, tokenize_tasks
    from med3dvlm.models.prompt import trim_padding

    rows = {"prompt": np.array([" Which organ?", " Describe."], dtype=object),
            "answer": np.array([" Liver", " A small lesion in the liver."], dtype=object), "volume": np.zeros(2)}
    full = {k: torch.as_tensor(v) for k, v in tokenize_tasks(rows, tiny.model.llm, tiny.model.image_tokens,
                                                              tiny.model.max_len).items()}
    cut = trim_padding(full)
    width, longest = cut["input_ids"].shape[1], int(full["attention_mask"].sum(1).max())
    assert width % 8 == 0 and width - 8 < longest <= width < tiny.model.max_len
    assert cut["labels"].shape == cut["attention_mask"].shape == cut["input_ids"].shape
    assert cut["volume"] is full["volume"]
    x = torch.rand(2, 1, *tiny.data.shape)
    batch = {k: full[k] for k in ("input_ids", "attention_mask", "labels")}
    assert torch.allclose(vlm(x, **batch).loss, vlm(x, **trim_padding(batch)).loss, atol=1e-6)

    clip = CLIPModel.from_config(tiny.model).eval()
    reports = {"report": np.array(["a small liver lesion", "the kidneys are normal in size"], dtype=object)}
    tk = {k: torch.as_tensor(v) for k, v in tokenize_reports(reports, tiny.model.text_encoder, 64).items()}
    short = trim_padding(tk)
    assert short["input_ids"].shape[1] < 64
    assert torch.allclose(clip.encode_text(**tk), clip.encode_text(**short), atol=1e-5)


def test_clip_save_load_round_trip(tiny, tmp_path):
    from dataclasses import replace

    m = CLIPModel.from_config(replace(tiny.model, text_encoder="tiny-bert")).eval()
    m.save_pretrained(tmp_path / "c")
    again = CLIPModel.from_pretrained(tmp_path / "c").eval()
    x = torch.rand(2, 1, *tiny.data.shape)
    tk = m.tokenize(["a small liver lesion", "normal kidney"])
    assert torch.equal(m.encode_image(x), again.encode_image(x))
    assert torch.equal(m.encode_text(**tk), again.encode_text(**tk))
    with pytest.raises(ValueError, match="expected a stage-2/3 export"):
        VLM.from_pretrained(tmp_path / "c")


def test_released_branches_follow_the_reference_hwd_layout():
    """Released c1/c2/c3 convolve along H/W/D of an (H, W, D) tensor: recompute one layer that way."""
    torch.manual_seed(0)
    ours = DecompConv3d(2, 3, 5).eval()
    for br in ours.branches:
        br[1].running_mean.uniform_(-0.5, 0.5)
    rel = {k: v for k, v in to_released({f"vision.stem.0.{k}": v for k, v in ours.state_dict().items()}).items()}
    x = torch.randn(1, 2, 6, 7, 8)  # (D, H, W)
    xh = x.permute(0, 1, 3, 4, 2)  # reference layout (H, W, D)
    out = 0
    for c, pad in (("c1", (2, 0, 0)), ("c2", (0, 2, 0)), ("c3", (0, 0, 2))):
        p = f"model.vision_tower.vision_tower.encoder.s0.0.0.{c}"
        y = F.conv3d(xh, rel[f"{p}.0.weight"], rel[f"{p}.0.bias"], padding=pad)
        out = out + F.batch_norm(y, rel[f"{p}.1.running_mean"], rel[f"{p}.1.running_var"], rel[f"{p}.1.weight"], rel[f"{p}.1.bias"])
    assert torch.allclose(out.permute(0, 1, 4, 2, 3), ours(x), atol=1e-5)


def test_folded_batchnorm_gives_the_same_tokens_in_eval_mode():
    enc = build_dcformer("nano")
    g = torch.Generator().manual_seed(0)
    for m in enc.modules():  # running statistics and affine terms far from the identity, so folding matters
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.normal_(0, 0.5, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
            m.weight.data.normal_(1, 0.3, generator=g)
            m.bias.data.normal_(0, 0.3, generator=g)
    x = torch.rand(2, 1, 32, 64, 64, generator=g)
    with torch.no_grad():
        before = enc.eval()(x)
        after = copy.deepcopy(enc).fold_batchnorm()(x)
    assert all(((a - b).abs().max() / a.abs().max()).item() <= 1e-5 for a, b in zip(before, after))
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in copy.deepcopy(enc).fold_batchnorm().modules())
    with pytest.raises(ValueError, match="eval mode"):
        enc.train().fold_batchnorm()


def test_a_zero_text_lr_freezes_the_text_tower(tiny):
    from dataclasses import replace

    from med3dvlm.train.engine import build_model, param_groups
    from med3dvlm.train.stages import get_stage

    assert tiny.train.stage1.text_lr_scale == 0
    frozen = build_model(tiny, get_stage(1), None)
    assert not any(p.requires_grad for p in frozen.text.parameters())
    assert all(p.requires_grad for p in frozen.vision.parameters())
    in_groups = {id(p) for g in param_groups(frozen, 1e-3, 0.1, 0.0) for p in g["params"]}
    assert not in_groups & {id(p) for p in frozen.text.parameters()}
    cfg = replace(tiny, train=replace(tiny.train, stage1=replace(tiny.train.stage1, text_lr_scale=0.1)))
    assert all(p.requires_grad for p in build_model(cfg, get_stage(1), None).text.parameters())

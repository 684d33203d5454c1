"""transformers' Trainer and TRL's SFTTrainer on a tiny MoE with 'ktsft'
experts and PEFT LoRA (attention + experts), on the CPU: the loss curve
matches the same run on transformers' eager experts; gradient
checkpointing (reentrant and not), bf16 autocast and gradient accumulation
train; a run resumed from a save_steps checkpoint gives the losses of the
uninterrupted run; TRL's reference-model copy works; the final adapter loads
into stock PEFT on a model that never saw ktsft."""
import copy

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import ktsft.integrations.transformers  # noqa: E402,F401  (registers "ktsft")
from hf_tiny import V, build, lora_config, rel, tokens  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402


class Bigrams(torch.utils.data.Dataset):
    """Sequences where the next token is perm[token]: learnable by LoRA."""

    def __init__(self, n=32, S=12, seed=0):
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(V - 3, generator=g) + 3
        x0 = torch.randint(3, V, (n, 1), generator=g)
        seq = [x0]
        for _ in range(S - 1):
            seq.append(perm[seq[-1] - 3])
        self.ids = torch.cat(seq, 1)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def peft_model(impl, family="qwen3_moe", seed=0):
    m = build(family, seed=seed)
    m.set_experts_implementation(impl)
    torch.manual_seed(1)
    return get_peft_model(m, lora_config(family))


class Losses(transformers.TrainerCallback):
    def __init__(self):
        self.losses = {}

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.losses[state.global_step] = logs["loss"]


def args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=4, learning_rate=5e-3,
                max_steps=6, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True,
                lr_scheduler_type="constant")
    base.update(kw)
    return transformers.TrainingArguments(**base)


def train(model, out, **kw):
    cb = Losses()
    tr = transformers.Trainer(model=model, args=args(out, **kw), train_dataset=Bigrams(),
                              callbacks=[cb])
    tr.train()
    return cb.losses, tr


def test_trainer_matches_eager(tmp_path):
    le, _ = train(peft_model("eager"), tmp_path / "e")
    lk, trk = train(peft_model("ktsft"), tmp_path / "k")
    assert sorted(lk) == sorted(le) and len(lk) == 6
    for s in le:
        assert abs(lk[s] - le[s]) <= 1e-4 * abs(le[s]) + 1e-6, (s, lk, le)
    assert lk[6] < lk[1]  # it learns


@pytest.mark.parametrize("kw", [
    dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True}),
    dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}),
    dict(gradient_accumulation_steps=2, per_device_train_batch_size=2),
    dict(bf16=True),
], ids=["ckpt-reentrant", "ckpt-nonreentrant", "grad-accum", "bf16-autocast"])
def test_trainer_options(tmp_path, kw):
    le, _ = train(peft_model("eager"), tmp_path / "e", **kw)
    lk, _ = train(peft_model("ktsft"), tmp_path / "k", **kw)
    tol = 2e-2 if kw.get("bf16") else 1e-4
    for s in le:
        assert abs(lk[s] - le[s]) <= tol * abs(le[s]) + 1e-6, (s, lk, le)
    assert lk[6] < lk[1]


def test_resume_from_checkpoint_gives_the_same_losses(tmp_path):
    full, _ = train(peft_model("ktsft"), tmp_path / "full")
    # the same run, checkpointed at step 3 and stopped there
    part_dir = tmp_path / "part"
    cb = Losses()

    class Stop(transformers.TrainerCallback):
        def on_step_end(self, a, state, control, **k):
            if state.global_step == 3:
                control.should_training_stop = True

    tr = transformers.Trainer(model=peft_model("ktsft"),
                              args=args(part_dir, save_strategy="steps", save_steps=3),
                              train_dataset=Bigrams(), callbacks=[cb, Stop()])
    tr.train()
    assert (part_dir / "checkpoint-3").is_dir()
    cb2 = Losses()
    tr2 = transformers.Trainer(model=peft_model("ktsft"),
                               args=args(part_dir, save_strategy="steps", save_steps=3),
                               train_dataset=Bigrams(), callbacks=[cb2])
    tr2.train(resume_from_checkpoint=str(part_dir / "checkpoint-3"))
    got = {**cb.losses, **cb2.losses}
    assert sorted(got) == sorted(full)
    for s in full:
        assert abs(got[s] - full[s]) <= 1e-5 * abs(full[s]), (s, got, full)
    # the final adapter is PEFT's own: it loads into a model that never saw ktsft
    tr2.model.save_pretrained(tmp_path / "adapter")
    ids = tokens(5)
    tr2.model.eval()
    with torch.no_grad():
        want = tr2.model(input_ids=ids).logits
    stock = build("qwen3_moe")
    stock.set_experts_implementation("eager")
    loaded = PeftModel.from_pretrained(stock, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert rel(loaded(input_ids=ids).logits, want) <= 1e-5


def _tokenizer():
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(V)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0",
                                                eos_token="t2", bos_token="t1", unk_token="t0")


def test_trl_sft_trainer_and_reference_model(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    data = datasets.Dataset.from_dict({"input_ids": Bigrams().ids.tolist()})
    losses = {}
    for impl in ("eager", "ktsft"):
        model = peft_model(impl)
        cb = Losses()
        cfg = trl.SFTConfig(output_dir=str(tmp_path / impl), per_device_train_batch_size=4,
                            learning_rate=5e-3, max_steps=4, logging_steps=1, save_strategy="no",
                            report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                            lr_scheduler_type="constant", bf16=False)  # TRL's default: bf16
        tr = trl.SFTTrainer(model=model, args=cfg, train_dataset=data,
                            processing_class=_tokenizer(), callbacks=[cb])
        tr.train()
        losses[impl] = cb.losses
        if impl == "ktsft":
            # TRL's reference model: a frozen deep copy of the (PEFT) model
            try:  # TRL >= 1.x moved it
                from trl.experimental.utils import create_reference_model
            except ImportError:
                create_reference_model = trl.create_reference_model
            ref = create_reference_model(tr.model)
            ids = tokens(6)
            tr.model.eval()
            with torch.no_grad():
                a = tr.model(input_ids=ids).logits
                b = ref(input_ids=ids).logits
            assert torch.equal(a, b)
            assert not any(p.requires_grad for p in ref.parameters())
    for s in losses["eager"]:
        assert abs(losses["ktsft"][s] - losses["eager"][s]) <= 1e-5 * abs(losses["eager"][s])


def _cpu_adamw(model):
    from ktsft.optim import CPUAdamW

    return CPUAdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3,
                    weight_decay=0.0, threads=2)


def test_trainer_with_cpu_adamw_matches_torch_adamw_and_resumes(tmp_path):
    """Trainer(optimizers=(CPUAdamW(...), None)): the losses of torch's AdamW
    (to fp32 rounding), and a run resumed from a checkpoint (optimizer.pt
    written by CPUAdamW.state_dict) gives the uninterrupted run's losses."""
    def run(out, opt_fn, stop_at=None, resume=None, **kw):
        model = peft_model("ktsft")
        cb = Losses()
        cbs = [cb]
        if stop_at:
            class Stop(transformers.TrainerCallback):
                def on_step_end(self, a, state, control, **k):
                    if state.global_step == stop_at:
                        control.should_training_stop = True
            cbs.append(Stop())
        tr = transformers.Trainer(model=model, args=args(out, weight_decay=0.0, **kw),
                                  train_dataset=Bigrams(), callbacks=cbs,
                                  optimizers=(opt_fn(model), None))
        tr.train(resume_from_checkpoint=resume)
        return cb.losses

    ref = run(tmp_path / "torch", lambda m: torch.optim.AdamW(
        [p for p in m.parameters() if p.requires_grad], lr=5e-3, weight_decay=0.0))
    full = run(tmp_path / "full", _cpu_adamw)
    assert sorted(full) == sorted(ref)
    for s in ref:
        assert abs(full[s] - ref[s]) <= 1e-4 * abs(ref[s]), (s, full, ref)
    part = tmp_path / "part"
    first = run(part, _cpu_adamw, stop_at=3, save_strategy="steps", save_steps=3)
    assert (part / "checkpoint-3" / "optimizer.pt").is_file()
    rest = run(part, _cpu_adamw, resume=str(part / "checkpoint-3"), save_strategy="steps",
               save_steps=3)
    got = {**first, **rest}
    for s in full:
        assert abs(got[s] - full[s]) <= 1e-5 * abs(full[s]), (s, got, full)

"""generate and chat use the training chat template; chat streams, keeps the conversation and resets it."""

from conftest import run_cli


def chat_replies(stdout: str) -> list[str]:
    """The model's replies as ``tunesmith chat`` printed them, one per ``model> `` line."""
    return [part.split("\n", 1)[0].strip() for part in stdout.split("model> ")[1:]]


def test_generate_and_chat_commands_on_a_trained_adapter(tiny_recipe, tmp_path, tiny_llama, cli):
    """generate in a real process (its standard error shows no library warning); chat in this process (``cli``,
    standard input given as a file): its subject is the conversation, kept and reset."""
    from tunesmith.data.templates import TEMPLATES
    from tunesmith.inference.generate import generate, load_for_inference, stream_reply
    from tunesmith.pipeline.finetune import finetune

    # Trained with the alpaca template, which the base tokenizer's fallback (simple) is not: the
    # replies below can only match if generate and chat take the template saved with the adapter.
    finetune(tiny_recipe("train.max_steps=2", "data.template=alpaca"), progress=False)
    adapter = str(tmp_path / "run" / "adapter")
    model, tokenizer = load_for_inference(tiny_llama, adapter)
    assert tokenizer.chat_template == TEMPLATES.get("alpaca")
    _, base_tokenizer = load_for_inference(tiny_llama)
    assert base_tokenizer.chat_template == TEMPLATES.get("simple")

    generated = run_cli("generate", "--model", tiny_llama, "--adapter", adapter, "--prompt", "Once upon a time",
                        "--max-new-tokens", "8")
    assert generated.returncode == 0, generated.stderr
    assert "trust_remote_code" not in generated.stderr  # bitsandbytes' hub-kernel warning is not shown (-v shows it)
    once = [{"role": "user", "content": "Once upon a time"}]
    assert generated.stdout.strip() == generate(model, tokenizer, [once], max_new_tokens=8)[0]

    system = {"role": "system", "content": "Be brief."}
    first, second = "Tell me a story.", "What is the opposite of hot?"
    chat = cli("chat", "--model", tiny_llama, "--adapter", adapter, "--max-new-tokens", "8", "--system",
               "Be brief.", input=f"{first}\n{second}\n/reset\n{second}\n/exit\n")
    assert chat.returncode == 0, chat.stderr

    def reply(conversation, tok=tokenizer):
        return "".join(stream_reply(model, tok, conversation, max_new_tokens=8)).strip()

    one = reply([system, {"role": "user", "content": first}])
    with_history = [system, {"role": "user", "content": first}, {"role": "assistant", "content": one},
                    {"role": "user", "content": second}]
    two = reply(with_history)
    after_reset = reply([system, {"role": "user", "content": second}])
    # The checks below can tell history from none and one template from another on this model.
    assert all((one, two, after_reset)) and two != after_reset and two != reply(with_history, base_tokenizer)
    assert chat_replies(chat.stdout) == [one, two, after_reset], chat.stdout


def test_stream_reply_equals_batched_greedy_generation(tiny_llama):
    from tunesmith.inference.generate import generate, load_for_inference, stream_reply

    model, tokenizer = load_for_inference(tiny_llama)
    conversation = [{"role": "user", "content": "Lily went to the park."}]
    streamed = "".join(stream_reply(model, tokenizer, conversation, max_new_tokens=12)).strip()
    assert streamed == generate(model, tokenizer, [conversation], max_new_tokens=12)[0]


def test_stream_reply_streams_the_text_of_model_generate(tiny_llama):
    from tunesmith.data.encode import render_prompt
    from tunesmith.inference.generate import load_for_inference, stop_token_ids, stream_reply

    model, tokenizer = load_for_inference(tiny_llama)
    conversation = [{"role": "user", "content": "Tom had a red ball."}]
    prompt = tokenizer(render_prompt(tokenizer, conversation), add_special_tokens=False, return_tensors="pt")
    output = model.generate(**prompt, max_new_tokens=12, do_sample=False, eos_token_id=stop_token_ids(tokenizer),
                            pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(output[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    pieces = list(stream_reply(model, tokenizer, conversation, max_new_tokens=12))
    assert len(pieces) > 1 and "".join(pieces) == expected


def test_a_run_folder_holding_a_plain_peft_adapter_is_a_result(tiny_llama, tmp_path):
    """A run folder whose adapter/ was written by peft alone (no tunesmith.json) is an adapter result: what the server
    serves as ``runs/NAME`` and generate loads (inference/results.locate_result is the one reading of folders)."""
    import json

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunesmith.inference.results import load_result, locate_result

    torch.manual_seed(0)
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                          LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "run" / "adapter")
    config_file = tmp_path / "run" / "adapter" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "base_model_name_or_path": tiny_llama}))
    found = locate_result(tmp_path / "run")
    assert (found.kind, found.folder, found.run_dir, found.recorded_base) == (
        "adapter", tmp_path / "run" / "adapter", tmp_path / "run", tiny_llama)
    loaded = load_result(tmp_path / "run")
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, lora(ids).logits)

"""generate and chat use the training chat template; chat streams and keeps the conversation."""

from conftest import run_cli


def test_generate_and_chat_commands_on_a_trained_adapter(tiny_recipe, tmp_path, stories260k):
    from tunesmith.finetune import finetune

    finetune(tiny_recipe("train.max_steps=2"), progress=False)
    adapter = str(tmp_path / "run" / "adapter")
    generated = run_cli("generate", "--model", stories260k, "--adapter", adapter, "--prompt", "Once upon a time",
                        "--max-new-tokens", "8")
    assert generated.returncode == 0 and generated.stdout.strip(), generated.stderr
    chat = run_cli("chat", "--model", stories260k, "--adapter", adapter, "--max-new-tokens", "8",
                   input="Tell me a story.\n/reset\nAnother one.\n/exit\n")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.count("model> ") == 2


def test_stream_reply_equals_batched_greedy_generation(stories260k):
    from tunesmith.inference import generate, load_for_inference, stream_reply

    model, tokenizer = load_for_inference(stories260k)
    conversation = [{"role": "user", "content": "Lily went to the park."}]
    streamed = "".join(stream_reply(model, tokenizer, conversation, max_new_tokens=12)).strip()
    assert streamed == generate(model, tokenizer, [conversation], max_new_tokens=12)[0]

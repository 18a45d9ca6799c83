"""The random-weight offline models, tiny-qwen2, tiny-llama and tiny-opt: real architectures with real,
round-trippable tokenizers and chat templates, built deterministically in well under a second each, to make
tests fast (harness.models.offline names them)."""
from __future__ import annotations

from pathlib import Path

from harness.locations import STORIES260K_DIR
from harness.models.builders import quiet_transformers

_SEED = 0


# Qwen2-Instruct's ChatML template, verbatim (including its default system prompt).
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


_TINY_MAX_POSITIONS = 2048


# Byte alphabet (256) + ~770 merges. The first ~500 merges are pairs seen at least twice; the rest
# finish off rarer words (ties are broken deterministically by the trainer).
_BPE_VOCAB_SIZE = 1024


# Training text for the tiny byte-level BPE tokenizers. It is embedded (not read from data/) so a
# build never depends on which data files are present, and the vocabulary never changes silently.
# Byte-level BPE encodes *any* text; this corpus only decides which merges exist.
_BPE_CORPUS = """\
Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her friends.
One day, she saw a big, red ball under a tree. "Can I play with it?" she asked her mom. Her mom smiled and said yes.
Tom was a small boy who liked to build things. He made a tall tower of blocks, and then the cat knocked it down!
They were sad at first, but then they laughed and built it again, even taller than before.
The sun was warm and the sky was blue. Birds sang in the trees while the children ran across the green grass.
Ben had a little dog called Max. Every morning they walked to the river, and Max tried to catch the fish.
"You are my best friend," Ben said, and Max wagged his tail. They sat on the bench and watched the boats.
In the evening, Mom made soup for dinner. Lily helped her cut the carrots and put the bread on the table.
After dinner, Dad read a story about a brave knight, a kind dragon and a princess who wanted to fly.
Lily closed her eyes and dreamed about flying over the mountains, the forests and the big blue sea.
The next day it was raining, so the children stayed inside. They drew pictures and played a game with cards.
When the rain stopped, they went outside again and jumped in the puddles. Their shoes were wet, but they were happy.

Below is an instruction that describes a task. Write a response that appropriately completes the request.
### Instruction:
Give three tips for staying healthy.
### Response:
1. Eat a balanced diet with plenty of fruits and vegetables.
2. Exercise regularly, for example 30 minutes of walking every day.
3. Get enough sleep: most adults need 7-9 hours per night.

### Instruction:
Translate the following sentence into French: "The weather is nice today."
### Response:
Il fait beau aujourd'hui.

### Instruction:
What is the capital of France?
### Response:
The capital of France is Paris. It is known for the Eiffel Tower, the Louvre museum and its cafes.

### Instruction:
Summarize the following review in one sentence.
### Input:
This movie was absolutely wonderful. The acting was great, the story kept me interested from start to finish,
and the music was beautiful. I would recommend it to anyone who enjoys a good drama.
### Response:
The reviewer loved the film's acting, story and music and recommends it.

### Instruction:
Explain what a neural network is to a ten-year-old.
### Response:
A neural network is a computer program that learns from examples. If you show it many pictures of cats and dogs,
it slowly learns which parts of a picture make it a cat or a dog, a bit like how you learn by practicing.

### Instruction:
Write a short email asking a colleague for the latest sales report.
### Response:
Hi Anna, could you please send me the latest sales report when you have a moment? I would like to review the
numbers before our meeting on Thursday. Thank you very much for your help! Best regards, David

### Instruction:
Classify the sentiment of the following sentence as positive, negative or neutral.
### Input:
The service was slow, but the food was excellent.
### Response:
The sentiment is mixed, so the best single label is neutral.

### Instruction:
List the steps to make a cup of tea.
### Response:
First, boil some water. Second, put a tea bag in a cup. Third, pour the hot water over the tea bag and wait for
three to five minutes. Finally, remove the tea bag and add milk, sugar or lemon if you like.

### Instruction:
Rewrite the sentence in the passive voice: "The students wrote the report."
### Response:
The report was written by the students.

This film was a complete waste of time. The plot made no sense, the dialogue was terrible, and I couldn't wait
for it to end. Don't bother watching it; I've seen better movies on a Sunday afternoon on TV.
I didn't expect much, but it's actually a fun, clever and well-made comedy - 8/10.

Fine-tuning adapts a pretrained language model to a new task using a smaller dataset. Parameter-efficient methods
such as LoRA, DoRA, prefix tuning and prompt tuning train only a few extra parameters while the base model's weights
stay frozen. Quantization stores weights in 8-bit or 4-bit formats to reduce memory, and gradient checkpointing
trades compute for memory. The learning rate, batch size and number of epochs are the most important settings.
A training run reads the dataset, tokenizes every example, and then updates the model for a number of steps.
The loss should go down during training; if the evaluation loss starts to go up, the model is overfitting.
Each model has a tokenizer, a configuration and a set of weights, which are saved together in one folder.
A chat template turns a list of messages with roles such as system, user and assistant into a single string.

def add(a, b):
    return a + b

for i in range(10):
    print(f"step {i}: loss={0.5 / (i + 1):.4f}")

{"instruction": "Write a haiku about autumn.", "input": "", "output": "Leaves fall softly down"}
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14 1,000,000 50% $20 #1 @user (yes) [no] {maybe} <tag> a/b a|b ~x
Email me at hello@example.com or visit https://example.org/docs?page=2&lang=en for more information.
Questions? Answers! Well... maybe; perhaps: "quoted" 'single' `code` -- dash * star + plus = equals ^ caret
UPPER CASE WORDS, Title Case Words, and lower case words all appear in ordinary English text.
你好，世界！这是一个用于测试的句子。机器学习和自然语言处理很有趣。
Café, naïve, résumé, jalapeño, Zürich, São Paulo, Łódź — unicode letters and “smart quotes” too.
"""


def build_tiny_qwen2(out: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    # transformers 5 always rebuilds a qwen2 tokenizer through Qwen2Tokenizer.__init__ (NFC + Qwen2's
    # split regex + ByteLevel), keeping only vocab and merges from tokenizer.json. Training through
    # that very pipeline (taken from the class, not copied) is what makes ids survive a reload.
    pipeline = Qwen2Tokenizer().backend_tokenizer
    vocab, merges = _train_byte_level_bpe(pipeline, special_tokens=[])
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        # Like Qwen2 base models: <|endoftext|> is eos, pad and unk (byte-level BPE never needs unk);
        # the ChatML markers are extra special tokens appended after the BPE vocabulary.
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=_TINY_MAX_POSITIONS,
        padding_side="right",
        chat_template=QWEN2_CHAT_TEMPLATE,
    )
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=_TINY_MAX_POSITIONS,
        # Untied, like Qwen2-7B: recipes that touch lm_head (modules_to_save, resizing) see a real
        # separate matrix. tiny-llama and tiny-opt cover the tied case.
        tie_word_embeddings=False,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
    )
    # Chat generation should stop at <|im_end|> as well, as with Qwen2-Instruct.
    _save_random_model(Qwen2ForCausalLM, config, tokenizer, out, eos_token_id=[eot, im_end])


def build_tiny_llama(out: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    # Reuse the real stories260k tokenizer (SentencePiece-style BPE, byte fallback, Alpaca template).
    # Only model_max_length changes, to match this model's longer position range.
    stories = str(STORIES260K_DIR)  # shipped in the checkout
    tokenizer = AutoTokenizer.from_pretrained(stories, model_max_length=_TINY_MAX_POSITIONS)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=_TINY_MAX_POSITIONS,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    _save_random_model(LlamaForCausalLM, config, tokenizer, out, eos_token_id=tokenizer.eos_token_id)


def build_tiny_opt(out: Path) -> None:
    from transformers import GPT2Tokenizer, OPTConfig, OPTForCausalLM

    from harness.models.llama2c import ALPACA_CHAT_TEMPLATE  # here, not at the top: the converter imports torch


    # transformers 5 maps model_type "opt" to GPT2Tokenizer, whose __init__ rebuilds a plain ByteLevel
    # pre-tokenizer and decoder from vocab + merges. Train through that same pipeline. The specials
    # come first so the ids match OPT's fairseq layout: <s>=0, <pad>=1, </s>=2, <unk>=3.
    pipeline = GPT2Tokenizer().backend_tokenizer
    vocab, merges = _train_byte_level_bpe(pipeline, special_tokens=["<s>", "<pad>", "</s>", "<unk>"])
    tokenizer = GPT2Tokenizer(
        vocab=vocab,
        merges=merges,
        # As in facebook/opt-*: "</s>" is both BOS and EOS and is prepended to every encoded text.
        bos_token="</s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        add_bos_token=True,
        model_max_length=_TINY_MAX_POSITIONS,
        padding_side="right",
        chat_template=ALPACA_CHAT_TEMPLATE,
    )
    config = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=64,
        max_position_embeddings=_TINY_MAX_POSITIONS,
        do_layer_norm_before=True,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    _save_random_model(OPTForCausalLM, config, tokenizer, out, eos_token_id=tokenizer.eos_token_id)


def _train_byte_level_bpe(pipeline, special_tokens: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a byte-level BPE on the embedded corpus through ``pipeline``'s normalizer and pre-tokenizer.

    Returns ``(vocab, merges)``, ready for a transformers tokenizer class's ``__init__``.
    """
    import json

    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    tokenizer = Tokenizer(BPE())
    tokenizer.normalizer = pipeline.normalizer
    tokenizer.pre_tokenizer = pipeline.pre_tokenizer
    trainer = BpeTrainer(
        vocab_size=_BPE_VOCAB_SIZE,
        special_tokens=special_tokens,
        # All 256 byte symbols, so any text (emoji, CJK, ...) encodes without an unknown token.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_BPE_CORPUS.splitlines(keepends=True), trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    return model["vocab"], [tuple(m) for m in model["merges"]]


def _save_random_model(model_cls, config, tokenizer, out: Path, *, eos_token_id) -> None:
    """Initialise ``model_cls(config)`` from a fixed seed and save it with its tokenizer into ``out``."""
    import torch
    from transformers import GenerationConfig

    config.dtype = "float32"
    # fork_rng: seed for reproducible weights without disturbing the caller's RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        model = model_cls(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=eos_token_id, pad_token_id=config.pad_token_id
    )
    # A first-use build happens inside other commands (often just before they print a one-line error):
    # transformers' "Writing model shards" bar on stderr would only get in their way.
    with quiet_transformers():
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)

"""How a conversation becomes text: the one rendering that supervised datasets and chat serving share.

A model is trained on conversations rendered one way and must be prompted the same way, so the dataset
service (format=chat / format=pairs) and the inference service (`/openai/v1/chat/completions`) both
render with the tokenizer's own `chat_template` (an imported Qwen2 or Llama checkpoint brings one) and,
when the tokenizer has none, with `DEFAULT_CHAT_TEMPLATE` below: ChatML, as Qwen2 uses, so a model
llmp trains and a ChatML model are prompted alike. A tokenizer llmp trains for chat data carries the
ChatML markers as special tokens (so each is one token and `END_OF_TURN` can stop generation) and
the template in its `tokenizer_config.json`, so the trained model brings its template with it.

Roles are OpenAI's. A pair (`{"prompt", "completion"}`) is the conversation
[user: prompt, assistant: completion].
"""

from __future__ import annotations

ROLES = ("system", "user", "assistant")
ANSWER_ROLE = "assistant"  # the tokens a supervised loss is computed on

TURN_START = "<|im_start|>"
END_OF_TURN = "<|im_end|>"  # generation of a chat answer stops at this token
CHAT_SPECIAL_TOKENS = (TURN_START, END_OF_TURN)

# Jinja, as transformers' `apply_chat_template` runs it. Each message is
# "<|im_start|>{role}\n{content}<|im_end|>\n"; the generation prompt opens the assistant's turn.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def pair_messages(prompt: str, completion: str) -> list[dict[str, str]]:
    """A `format=pairs` line as the conversation it stands for."""
    return [{"role": "user", "content": prompt}, {"role": ANSWER_ROLE, "content": completion}]

"""Question wordings of the synthetic VQA set, in families, and the one honest answer.

Every question a sample asks comes from one of three wording families:

- `base`: the phrasings the demo model was first trained and tested on (`vqa_data.QUESTIONS` for
  the five core types); training and the existing test split use them.
- `paraphrase`: further phrasings that training uses too.
- `held_out`: phrasings that training never sees; evaluation asks them to measure how far the
  model generalises beyond the wordings it learned.

A sample records its family (`VQASample.wording`), so an evaluation can report held-out wordings
on their own. Templates use `{shape}` (the Chinese noun, or the English singular) and `{shapes}`
(the English plural).

Questions outside the model's lessons (greetings, world knowledge, requests to describe a photo)
and images outside its world all get the same short honest sentence, `HONEST_ANSWER`, in the
question's language: a fixed answer is one the model can learn exactly and end cleanly.
"""

from __future__ import annotations

WORDING_FAMILIES: tuple[str, ...] = ("base", "paraphrase", "held_out")
# The families training draws from; `held_out` is for evaluation only.
TRAIN_FAMILIES: tuple[str, ...] = ("base", "paraphrase")

HONEST_ANSWER: dict[str, str] = {
    "en": "I can only describe simple shapes, colors, counts and words.",
    "zh": "我只能描述简单的形状、颜色、数量和文字。",
}

# Further wordings of the five core question types, per (type, language). The base wordings are
# `vqa_data.QUESTIONS`, left as they were so that the samples of the existing splits stay the same.
CORE_PARAPHRASES: dict[tuple[str, str], dict[str, tuple[str, ...]]] = {
    ("shape", "en"): {
        "paraphrase": (
            "What is this shape?",
            "What shape do you see?",
            "What kind of shape is in the picture?",
            "Can you tell me what shape this is?",
            "Identify the shape.",
            "What shape is it?",
            "What is the shape in this image?",
        ),
        "held_out": ("What shape is drawn here?", "Tell me which shape this is."),
    },
    ("shape", "zh"): {
        "paraphrase": (
            "这是什么图形?",
            "图片里是什么形状?",
            "请说出图中的形状。",
            "这个形状叫什么?",
            "图中画了什么形状?",
        ),
        "held_out": ("画的是哪种形状?", "图上是什么图形？"),
    },
    ("color", "en"): {
        "paraphrase": (
            "What is the color of the {shape}?",
            "What colour is the {shape}?",
            "Which color is the {shape}?",
            "Can you tell me the color of the {shape}?",
            "The {shape} is what color?",
            "What color is the {shape} in the picture?",
        ),
        "held_out": ("What color does the {shape} have?", "Please tell me what color the {shape} is."),
    },
    ("color", "zh"): {
        "paraphrase": ("{shape}是什么色?", "请问{shape}是什么颜色?", "{shape}是哪种颜色?", "图里的{shape}是什么颜色?"),
        "held_out": ("{shape}的颜色是哪种?", "那个{shape}是什么颜色？"),
    },
    ("count", "en"): {
        "paraphrase": (
            "How many {shapes} do you see?",
            "How many {shapes} can you count?",
            "What is the number of {shapes}?",
            "How many {shapes} are shown?",
            "Count how many {shapes} there are.",
            "How many {shapes} are there in the picture?",
        ),
        "held_out": ("How many {shapes} are in this picture?", "Tell me how many {shapes} there are."),
    },
    ("count", "zh"): {
        "paraphrase": ("有几个{shape}?", "图中{shape}有几个?", "一共有几个{shape}?", "请数一下{shape}有几个。"),
        "held_out": ("图上有多少个{shape}?", "{shape}一共有多少个？"),
    },
    ("text", "en"): {
        "paraphrase": (
            "What does it say?",
            "Read the text.",
            "What is the word?",
            "Which word is shown?",
            "What text is in the image?",
            "Read what is written.",
        ),
        "held_out": ("What is written here?", "Can you read the word in the picture?"),
    },
    ("text", "zh"): {
        "paraphrase": ("写的是什么?", "图上写了什么?", "请读出图中的字。", "这是什么字?"),
        "held_out": ("图片上写的是什么？", "上面写着什么字?"),
    },
    ("position", "en"): {
        "paraphrase": (
            "Where is the {shape} located?",
            "Where can you see the {shape}?",
            "Where in the picture is the {shape}?",
            "In which part of the image is the {shape}?",
        ),
        "held_out": ("Where is the {shape} placed?", "Which part of the picture is the {shape} in?"),
    },
    ("position", "zh"): {
        "paraphrase": ("{shape}在什么地方?", "{shape}在图的哪里?", "{shape}在图中哪个位置?"),
        "held_out": ("{shape}位于哪里?", "图里的{shape}在哪儿？"),
    },
}

# "What color is this?" about an image that is one color all over (answer: "It is red.").
CANVAS_QUESTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "en": {
        "base": ("What color is this?",),
        "paraphrase": (
            "What color is the image?",
            "What colour is this?",
            "Which color is this?",
            "What color is it?",
            "What color do you see?",
            "What is the color of this image?",
            "What color is this picture?",
        ),
        "held_out": ("Tell me the color of this image.", "Which color fills the picture?"),
    },
    "zh": {
        "base": ("这是什么颜色?",),
        "paraphrase": ("图片是什么颜色?", "这是什么颜色？", "这张图是什么颜色?", "图是什么颜色的?", "这个颜色是什么?"),
        "held_out": ("整张图是什么颜色?", "图片的颜色是什么?"),
    },
}

# The color of the one shape in a picture, asked without naming it (answer: "The circle is red.").
SCENE_COLOR_QUESTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "en": {
        "base": ("What color is the shape?",),
        "paraphrase": (
            "What color is this shape?",
            "What color is this?",
            "What color is it?",
            "Which color is the shape?",
            "What is the color of the shape?",
        ),
        "held_out": ("What colour is the shape in the picture?", "Tell me the shape's color."),
    },
    "zh": {
        "base": ("形状是什么颜色?",),
        "paraphrase": ("这个形状是什么颜色?", "这是什么颜色?", "图形是什么颜色?", "图中的形状是什么颜色?"),
        "held_out": ("这个图形是什么颜色？", "形状的颜色是什么?"),
    },
}

# Questions outside the lessons, whatever the image: greetings, world knowledge, instructions.
OFF_TOPIC_QUESTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "en": {
        "base": ("Hello!", "What is the capital of France?"),
        "paraphrase": (
            "Hi",
            "Hello, who are you?",
            "Who are you?",
            "How are you?",
            "Thank you!",
            "Tell me a joke.",
            "What is 2 + 2?",
            "What time is it?",
            "Write a poem about the sea.",
            "Translate 'cat' into French.",
            "What is the meaning of life?",
            "Who is the president of the United States?",
            "Can you write some Python code?",
            "Summarize this document.",
            "What is the weather like?",
        ),
        "held_out": ("Good morning!", "What is the capital of Japan?", "Can you help me with my homework?"),
    },
    "zh": {
        "base": ("你好!", "法国的首都是哪里?"),
        "paraphrase": (
            "你好",
            "你是谁?",
            "你好吗?",
            "谢谢!",
            "讲个笑话。",
            "一加一等于几?",
            "现在几点了?",
            "写一首关于大海的诗。",
            "把猫翻译成英文。",
            "今天天气怎么样?",
            "帮我写一段代码。",
        ),
        "held_out": ("早上好!", "日本的首都是哪里?", "你能帮我做作业吗?"),
    },
}

# Open questions about a picture: the lessons never answer them, so a photo or screenshot (or no
# image at all) asked one of these gets the honest answer.
DESCRIBE_QUESTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "en": {
        "base": ("Describe this image.", "What is in this picture?"),
        "paraphrase": (
            "What do you see?",
            "What is this?",
            "What is shown in the image?",
            "Describe the picture in detail.",
            "What is happening in this photo?",
            "Can you describe this?",
            "What is on the screen?",
        ),
        "held_out": ("What can you see in this photo?", "Explain this image."),
    },
    "zh": {
        "base": ("描述一下这张图片。", "图片里有什么?"),
        "paraphrase": ("你看到了什么?", "这是什么?", "图中显示了什么?", "详细描述这张图。", "屏幕上是什么?"),
        "held_out": ("这张照片里有什么?", "解释一下这张图。"),
    },
}


def fill(template: str, lang: str, shape: str | None, shape_zh_noun: dict[str, str]) -> str:
    """A template with its shape slots filled (templates without slots come back unchanged)."""
    if shape is None:
        return template
    if lang == "zh":
        return template.format(shape=shape_zh_noun[shape])
    return template.format(shape=shape, shapes=shape + "s")

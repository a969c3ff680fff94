"""Realistic synthetic instructions for the dedup benchmark, the same for the same seed.

What a teacher model produces in a self-instruct run: many fresh instructions from
a few dozen task shapes, over a long tail of topics, and many near-repeats of what
it already wrote (a synonym here, a clause added there, the same request reworded).

    fresh      a template with [a|b] wording choices x slots: forms, audiences, numbers,
               inline inputs, and topics: aspect + modifier + subject + setting
               (subjects drawn Zipf-like) or a made-up named thing (the long tail)
    near-copy  an earlier instruction (usually a recent one, like a teacher repeating
               itself within a batch) with 1-3 paraphrase operations: synonym swaps,
               a clause added, clauses reordered, case/punctuation changes, a word
               dropped, a polite prefix, the same slots in another template

ROUGE-L > 0.7 removes 31% of 2,000, 47% of 20,000 and 75% of 1,000,000 (novelty
runs out as the set grows). See bench/README.md.

    >>> instructions(2, seed=1)[1]
    'Rewrite this review to be more persuasive: my cloud visited the quantum jacket near the Callo index. Format the answer as a list.'
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import random
import re

# [a|b|c] picks one wording per instruction, so two instructions from one template
# rarely share the whole frame (as with a real teacher); {slot} fills in content.
TEMPLATES = [
    "[Write|Compose|Draft|Create|Produce] a [short |funny |sad |rhyming |][form] [about|on|inspired by] {topic}.",
    "[Explain|Describe|Clarify|Break down] {topic} [to|for] {audience}[| in simple terms| using an analogy].",
    "[How does|Why does|When did|Where did] {topic} [work|matter|begin|change|fail]?",
    "[Give me|Provide|List|Share|Suggest] {n} [tips|ideas|tricks|pieces of advice|suggestions] for {activity}[| in {city}| as {audience}].",
    "[List|Name|Enumerate|State] {n} [surprising |little-known |important |]facts about {topic}.",
    "[Generate|Produce|Come up with|Make] {n} {things} [related to|about|connected with] {topic}.",
    "[Summarize|Condense|Sum up|Shorten] [this|the following|the given] {doc} [about|on] {topic}[| in {n} sentences| in one line].",
    "[Classify|Label|Determine] the [sentiment|tone|mood] of [this|the following] {doc}: {sentence}",
    "Translate [this|the following|the sentence] [into|to] {language}: {sentence}",
    "[What are the|Name the|Explain the|Describe the] [differences|similarities|main contrasts] between {topic} and {topic2}[?|.]",
    "[Compare|Contrast|Weigh] {topic} [with|and|against] {topic2}[.| for {audience}.]",
    "[Describe|Outline|Trace|Recount] the [history|origins|evolution|rise] of {topic}.",
    "[Suggest|Propose|Invent|Brainstorm] {n} [names|slogans|taglines] for a {business} [in|near|based in] {city}.",
    "[Create|Make|Design|Draw up] a {n}-[day|week|month] [plan|schedule|routine] for {activity}.",
    "[Rewrite|Rephrase|Edit] [this|the following] {doc} [to sound|so it sounds|to be] more {tone}: {sentence}",
    "[Write|Draft|Compose] a {tone} [email|letter|message|note] to {person} [about|regarding|concerning] {topic}.",
    "[Correct|Fix|Check] the [grammar|spelling|punctuation] [in|of] [this|the] sentence: {sentence}",
    "[Design|Create|Write|Prepare] a [quiz|test|set of questions|trivia game] [about|on|covering] {topic}.",
    "[Why is|Why should we care about|What makes|How important is] {topic}[ important|]?",
    "[Propose|Suggest|Formulate|Pose] a [research question|hypothesis|thesis statement] [about|on|for] {topic}.",
    "[Write|Create|Script] a [dialogue|conversation|debate] between {person} and {audience} [about|on] {topic}.",
    "[Outline|List|Explain|Describe] the [steps|stages|basics] [for|of|involved in] {activity}.",
    "[What is|Identify|Find|State] the [main idea|key point|central claim] of [this|the following] {doc}: {sentence}",
    "[Write|Implement|Create|Code] a {language2} [function|script|program|class] that {code_task}.",
    "[Explain|Walk through|Review] this {language2} [code|snippet] and {code_fix} it: {snippet}",
    "[What causes|What explains|Why do we see|Where does] {phenomenon}[| come from]?",
    "[How can|In what ways can|What can] {audience} [help with|contribute to|learn about|improve] {topic}?",
    "[Brainstorm|List|Think of|Suggest] {n} [uses|creative uses|new uses|purposes] for a {object}[| at home| at work| outdoors].",
    "[Make|Write|Prepare|Create] a [shopping|packing|to-do|checklist] list for {activity}.",
    "[Turn|Convert|Transform|Reshape] [these|the following|my] notes [on|about] {topic} into a {form}.",
    "[Write|Draft|Create] a [product description|short ad|catchy blurb] for the {product} {object}.",
    "[Predict|Forecast|Speculate about|Imagine] the future of {topic}[| in {n} years| by 2050].",
    "[Give|Provide|Share|Offer] [an example|two examples|a real-world example] of {phenomenon}.",
    "[Evaluate|Weigh|Assess|List] the [pros and cons|advantages and disadvantages|risks and benefits] of {topic}.",
    "[Create|Write|Invent|Come up with] a [riddle|puzzle|brain teaser|joke] [about|whose answer is] a {object}.",
    "[Tell me|Share|Write|Give me] a [joke|pun|funny story|fun fact] about {topic}.",
    "[Recommend|Suggest|List] {n} [books|films|podcasts|courses] [on|about] {topic}.",
    "[Write|Draft|Compose] a [short |brief |]biography of {person}, a {profession} from {city}.",
    "[Plan|Organize|Map out|Design] a [weekend|three-day|week-long|day] trip to {city}[| for {audience}].",
    "[Write|Draft|Compose] a [review|critique|rating] of the {product} {object}.",
    "[Draft|Write|Prepare] a cover letter for {person}[, a {profession}|, who wants a job as a {profession}].",
    "[Who is|Who was|Tell me about] {person}[?|, the {profession}?]",
    "[Describe|Imagine|Narrate] a [typical|busy|perfect] day [of|for|in the life of] a {profession} in {city}.",
    "[Write|Suggest|Draft] a [news headline|title|caption] [about|for] {topic}.",
    "[Name|List|Describe] {n} [challenges|problems|risks] a {profession} [faces|deals with|encounters].",
    "[Write|Suggest|Prepare|List] {n} interview questions for a {profession}.",
    "[Find|Identify|Spot] the odd one out: {word_list}.",
    "[Sort|Arrange|Order] [these|the following] words [alphabetically|by length]: {word_list}.",
    "[Is|Decide whether|Tell me if] this statement [is |]true or false: {sentence}",
    "[Paraphrase|Reword|Restate] [this|the following] sentence: {sentence}",
    "[Extract|List|Find] the [names|nouns|verbs|places] [in|mentioned in|from] [this|the] sentence: {sentence}",
    "[Rate|Score|Grade] [this|the following] {doc} [from 1 to 10|out of 5]: {sentence}",
    "[Calculate|Compute|What is|Find] {x} [times|plus|minus] {y}[.|?]",
    "[Convert|Change|Express] {x} {unit} [to|into|in] {unit2}.",
    "[Write|Create|Invent] a [slogan|motto|jingle] for {product}, a {business} in {city}.",
    "[What should|What must|What can] {person} [bring|pack|take] for {activity}?",
]
ASPECTS = [
    "",
    "",
    "",
    "",
    "",
    "the history of",
    "the future of",
    "the economics of",
    "the ethics of",
    "the science behind",
    "common myths about",
    "careers in",
    "safety in",
    "recent advances in",
    "the environmental impact of",
    "the role of women in",
    "the politics of",
    "the art of",
    "famous failures in",
    "the basics of",
    "the psychology of",
    "the cost of",
    "innovation in",
    "regulation of",
    "the culture of",
    "misconceptions about",
    "the language of",
    "data on",
]
SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ren",
    "tas",
    "vo",
    "bel",
    "dor",
    "fi",
    "gan",
    "hu",
    "jel",
    "kor",
    "lin",
    "mar",
    "nel",
    "os",
    "pra",
    "qui",
    "ros",
    "sel",
    "tor",
    "ul",
    "ven",
    "wil",
    "xan",
    "yor",
    "zu",
    "ash",
    "bri",
    "cal",
    "dra",
    "em",
    "fon",
    "gri",
    "hal",
    "ith",
    "jun",
    "kel",
    "mor",
]
# Specific things real instructions name ("the Krebs cycle", "the Treaty of Ghent"): a
# made-up name plus a kind, so the vocabulary has the long tail of rare tokens it has
# in real data (and which prefix filtering relies on).
KINDS = [
    "method",
    "theorem",
    "festival",
    "river",
    "dynasty",
    "algorithm",
    "protocol",
    "novel",
    "painting",
    "treaty",
    "cycle",
    "effect",
    "syndrome",
    "bridge",
    "valley",
    "movement",
    "reaction",
    "index",
    "engine",
    "language",
    "school",
    "trail",
    "cathedral",
    "experiment",
    "equation",
    "revolution",
    "opera",
    "museum",
]
PROFESSIONS = [
    "nurse",
    "pilot",
    "carpenter",
    "teacher",
    "chef",
    "lawyer",
    "architect",
    "farmer",
    "plumber",
    "journalist",
    "librarian",
    "firefighter",
    "data scientist",
    "electrician",
    "pharmacist",
    "photographer",
    "translator",
    "veterinarian",
    "accountant",
    "tailor",
    "mechanic",
    "biologist",
]
UNITS = ["miles", "kilometers", "pounds", "kilograms", "liters", "gallons", "inches", "centimeters", "hours", "minutes"]
WORDS = [
    "apple",
    "river",
    "cloud",
    "pencil",
    "tiger",
    "violin",
    "carpet",
    "garden",
    "rocket",
    "marble",
    "ladder",
    "candle",
    "window",
    "anchor",
    "basket",
    "feather",
    "hammer",
    "island",
    "jacket",
    "kitten",
    "lemon",
    "mirror",
    "needle",
    "orange",
    "pillow",
    "quartz",
    "saddle",
    "tunnel",
    "velvet",
    "wagon",
]
ASPECTS = [
    "",
    "",
    "",
    "",
    "",
    "the history of",
    "the future of",
    "the economics of",
    "the ethics of",
    "the science behind",
    "common myths about",
    "careers in",
    "safety in",
    "recent advances in",
    "the environmental impact of",
    "the role of women in",
    "the politics of",
    "the art of",
    "famous failures in",
    "the basics of",
    "the psychology of",
    "the cost of",
    "innovation in",
    "regulation of",
    "the culture of",
    "misconceptions about",
    "the language of",
    "data on",
]

FORMS = [
    "poem",
    "haiku",
    "limerick",
    "short story",
    "essay",
    "tweet",
    "blog post",
    "speech",
    "song",
    "news article",
    "fable",
    "letter",
    "sonnet",
    "review",
    "slogan",
    "press release",
    "toast",
    "eulogy",
]
MODIFIERS = [
    "",
    "modern",
    "ancient",
    "urban",
    "rural",
    "sustainable",
    "digital",
    "global",
    "local",
    "renewable",
    "medieval",
    "tropical",
    "arctic",
    "industrial",
    "quantum",
    "classical",
    "public",
    "private",
    "small",
    "large-scale",
    "early",
    "experimental",
    "traditional",
    "online",
    "remote",
    "competitive",
    "organic",
    "wild",
    "coastal",
    "volcanic",
    "nocturnal",
    "automated",
    "shared",
]
SUBJECTS = [
    "energy",
    "agriculture",
    "architecture",
    "music",
    "cooking",
    "transport",
    "education",
    "medicine",
    "photography",
    "gardening",
    "astronomy",
    "robotics",
    "finance",
    "journalism",
    "fishing",
    "forestry",
    "mathematics",
    "chemistry",
    "biology",
    "geology",
    "linguistics",
    "philosophy",
    "economics",
    "painting",
    "sculpture",
    "theater",
    "cinema",
    "dance",
    "poetry",
    "chess",
    "football",
    "cycling",
    "swimming",
    "climbing",
    "sailing",
    "beekeeping",
    "brewing",
    "baking",
    "knitting",
    "pottery",
    "woodworking",
    "blockchain",
    "cryptography",
    "machine learning",
    "neural networks",
    "cloud computing",
    "databases",
    "compilers",
    "operating systems",
    "networking",
    "cybersecurity",
    "ecology",
    "oceans",
    "rainforests",
    "deserts",
    "glaciers",
    "volcanoes",
    "earthquakes",
    "hurricanes",
    "migration",
    "urban planning",
    "public health",
    "nutrition",
    "sleep",
    "meditation",
    "parenting",
    "retirement",
    "tourism",
    "fashion",
    "advertising",
    "marketing",
    "logistics",
    "manufacturing",
    "mining",
    "textiles",
    "recycling",
    "plastics",
    "batteries",
    "solar panels",
    "wind turbines",
    "electric cars",
    "trains",
    "aviation",
    "space travel",
    "satellites",
    "telescopes",
    "microscopes",
    "vaccines",
    "antibiotics",
    "genetics",
    "evolution",
    "dinosaurs",
    "whales",
    "bees",
    "ants",
    "wolves",
    "coral reefs",
    "mushrooms",
    "orchids",
    "coffee",
    "tea",
    "chocolate",
    "cheese",
    "bread",
    "rice",
    "wine",
    "spices",
    "libraries",
    "museums",
    "archives",
    "elections",
    "taxes",
    "law",
    "courts",
    "prisons",
    "immigration",
    "language learning",
    "translation",
    "typography",
    "calligraphy",
    "maps",
    "navigation",
    "clocks",
    "calendars",
    "bridges",
    "tunnels",
    "dams",
    "canals",
    "castles",
    "pyramids",
    "the printing press",
    "the internet",
    "smartphones",
    "video games",
    "social media",
    "podcasts",
    "streaming",
    "radio",
    "newspapers",
    "comics",
    "animation",
    "magic tricks",
    "origami",
    "board games",
    "puzzles",
    "robots",
    "drones",
    "3d printing",
    "virtual reality",
    "open source software",
    "remote work",
    "startups",
    "unions",
    "insurance",
    "banking",
    "inflation",
    "trade",
    "supply chains",
    "water",
    "air pollution",
    "noise",
    "light pollution",
    "soil",
    "forests",
    "rivers",
    "lakes",
    "islands",
    "mountains",
    "caves",
    "weather",
    "climate change",
    "tides",
    "eclipses",
    "comets",
    "black holes",
    "mars",
    "the moon",
    "jupiter",
    "saturn",
    "exoplanets",
    "gravity",
    "magnetism",
    "electricity",
    "sound",
    "light",
]
SETTINGS = [
    "",
    "",
    "in small towns",
    "in developing countries",
    "in the nineteenth century",
    "during winter",
    "in big cities",
    "for beginners",
    "in the classroom",
    "at home",
    "in africa",
    "in asia",
    "in europe",
    "in south america",
    "on a tight budget",
    "after the pandemic",
    "in the workplace",
    "for families",
    "in hospitals",
    "at sea",
    "in space",
    "in the future",
]
AUDIENCES = [
    "a five-year-old",
    "a high school student",
    "a busy manager",
    "a retired teacher",
    "a new employee",
    "a tourist",
    "a software engineer",
    "a farmer",
    "a nurse",
    "a history buff",
    "a skeptical investor",
    "my grandmother",
    "a group of scientists",
    "a customer",
    "a beginner",
    "a journalist",
    "a city council",
    "a teenager",
    "a chef",
    "an artist",
]
ACTIVITIES = [
    "learning to code",
    "saving money",
    "running a marathon",
    "starting a business",
    "moving abroad",
    "studying for exams",
    "cooking for a party",
    "planting a vegetable garden",
    "training a puppy",
    "writing a novel",
    "improving sleep",
    "learning a new language",
    "organizing a wedding",
    "decluttering a home",
    "preparing for a job interview",
    "hiking in the mountains",
    "reducing stress",
    "teaching children to read",
    "building a website",
    "fixing a bicycle",
]
THINGS = ["words", "questions", "ideas", "examples", "tools", "mistakes", "myths", "careers", "challenges", "projects"]
DOCS = ["paragraph", "text", "review", "article", "email", "sentence", "tweet", "story", "report", "essay"]
LANGUAGES = [
    "French",
    "Spanish",
    "German",
    "Chinese",
    "Japanese",
    "Italian",
    "Portuguese",
    "Russian",
    "Arabic",
    "Hindi",
]
TONES = ["formal", "friendly", "persuasive", "polite", "enthusiastic", "concise", "humorous", "professional"]
BUSINESSES = ["bakery", "startup", "podcast", "coffee shop", "bookstore", "gym", "charity", "consulting firm"]
OBJECTS = [
    "umbrella",
    "water bottle",
    "backpack",
    "lamp",
    "notebook",
    "chair",
    "bicycle",
    "kettle",
    "phone case",
    "pair of headphones",
    "wristwatch",
    "tent",
    "camera",
    "pen",
    "mirror",
    "candle",
]
CODE_TASKS = [
    "returns the largest element",
    "removes duplicates",
    "sorts the items in descending order",
    "computes the average",
    "checks whether a string is a palindrome",
    "counts the vowels in a word",
    "finds the second smallest number",
    "reverses a linked list",
    "merges two sorted lists",
    "returns the nth fibonacci number",
    "validates an email address",
    "converts celsius to fahrenheit",
]
CODE_FIXES = ["optimize", "fix", "test", "document", "simplify", "refactor"]
PHENOMENA = [
    "rainbows",
    "inflation",
    "the seasons",
    "tides",
    "procrastination",
    "rust",
    "thunder",
    "jet lag",
    "the northern lights",
    "peer pressure",
    "traffic jams",
    "ocean waves",
    "allergies",
    "fog",
]

SYNONYMS = {
    "write": ["compose", "draft", "create"],
    "compose": ["write"],
    "explain": ["describe", "clarify"],
    "describe": ["explain", "summarize"],
    "give": ["provide", "offer"],
    "list": ["name", "enumerate"],
    "generate": ["produce", "create", "make"],
    "create": ["make", "design", "build"],
    "make": ["create"],
    "summarize": ["condense", "sum up"],
    "short": ["brief"],
    "main": ["key", "major"],
    "key": ["main", "important"],
    "important": ["significant", "crucial"],
    "ways": ["methods", "approaches"],
    "tips": ["pieces of advice", "suggestions"],
    "facts": ["interesting facts", "details"],
    "simple": ["plain", "easy"],
    "following": ["given", "provided"],
    "about": ["on"],
    "suggest": ["propose", "recommend"],
    "identify": ["find", "determine"],
    "find": ["identify", "locate"],
    "plan": ["schedule", "program"],
    "design": ["create", "build"],
    "differences": ["distinctions"],
    "advantage": ["benefit"],
    "history": ["origins", "story"],
    "reduce": ["lower", "cut"],
    "predict": ["forecast"],
}
CLAUSES = [
    "Keep it under 100 words.",
    "Use simple language.",
    "Be concise.",
    "Include an example.",
    "Use a friendly tone.",
    "Avoid technical jargon.",
    "Format the answer as a list.",
    "Make it fun.",
    "Explain your reasoning.",
    "Do not use more than three sentences.",
]
PREFIXES = ["Please", "Can you", "Could you please", "I need you to", "Kindly"]


_CHOICE = re.compile(r"\[([^\]]*)\]")


def _zipf_picker(items: list, rng: random.Random, s: float = 1.0):
    """A function drawing items with weight 1/rank^s, so a few are common and most are rare."""
    cum = list(itertools.accumulate(1 / (r + 1) ** s for r in range(len(items))))
    order = items[:]
    rng.shuffle(order)
    return lambda: order[bisect.bisect(cum, rng.random() * cum[-1])]


class _Generator:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.subject = _zipf_picker(SUBJECTS, self.rng, 0.8)
        self.template = _zipf_picker(TEMPLATES, self.rng, 0.3)
        self.syllable = _zipf_picker(SYLLABLES, self.rng, 0.6)

    def topic(self) -> str:
        r = self.rng
        if r.random() < 0.5:
            thing = f"the {self.name(1)} {r.choice(KINDS)}"
            return f"{r.choice(ASPECTS)} {thing}".strip() if r.random() < 0.3 else thing
        words = [r.choice(ASPECTS), r.choice(MODIFIERS), self.subject(), r.choice(SETTINGS)]
        return " ".join(w for w in words if w)

    def slots(self) -> dict:
        r = self.rng
        return {
            "form": r.choice(FORMS),
            "topic": self.topic(),
            "topic2": self.topic(),
            "audience": r.choice(AUDIENCES),
            "n": str(r.choice([3, 4, 5, 5, 7, 10, 12, 20])),
            "activity": r.choice(ACTIVITIES),
            "things": r.choice(THINGS),
            "doc": r.choice(DOCS),
            "language": r.choice(LANGUAGES),
            "tone": r.choice(TONES),
            "business": r.choice(BUSINESSES),
            "object": r.choice(OBJECTS),
            "code_task": r.choice(CODE_TASKS),
            "code_fix": r.choice(CODE_FIXES),
            "phenomenon": r.choice(PHENOMENA),
            "person": self.name(2),
            "city": self.name(1).capitalize(),
            "product": self.name(1).capitalize(),
            "profession": r.choice(PROFESSIONS),
            "x": str(r.randrange(2, 1000)),
            "y": str(r.randrange(2, 1000)),
            "unit": r.choice(UNITS),
            "unit2": r.choice(UNITS),
            "sentence": self.sentence(),
            "word_list": ", ".join(r.sample(WORDS, 5)),
            "z": str(r.randrange(2, 100)),
            "language2": r.choice(
                ["Python", "JavaScript", "Java", "Rust", "Go", "C++", "Ruby", "SQL", "Haskell", "Bash"]
            ),
            "snippet": f"{r.choice(WORDS)} = [{r.choice(WORDS)}(x) for x in {self.name(1).lower()}]",
        }

    def name(self, parts: int) -> str:
        """A made-up proper name: the long tail of rare tokens real instructions have."""
        r = self.rng
        words = ["".join(self.syllable() for _ in range(r.choice([2, 2, 3]))) for _ in range(parts)]
        return " ".join(w.capitalize() for w in words)

    def sentence(self) -> str:
        """A made-up input sentence, as instructions with inline inputs carry."""
        r = self.rng
        subject = r.choice([self.name(1).capitalize(), "the " + r.choice(PROFESSIONS), "my " + r.choice(WORDS)])
        verb = r.choice(["loves", "ignored", "built", "sold", "painted", "found", "lost", "described", "visited"])
        return f"{subject} {verb} the {r.choice(MODIFIERS) or 'old'} {r.choice(WORDS)} near {self.topic()}."

    def fill(self, template: str, slots: dict) -> str:
        """Pick one wording for each [a|b] group, then fill the {slots}."""
        text = _CHOICE.sub(lambda m: self.rng.choice(m.group(1).split("|")), template)
        return text.format(**slots)

    def fresh(self) -> tuple[str, dict]:
        slots = self.slots()
        text = self.fill(self.template(), slots)
        if self.rng.random() < 0.3:  # teachers vary their wording even when not repeating
            text = self.swap_synonym(text)
        return text, slots

    def swap_synonym(self, text: str) -> str:
        words = text.split(" ")
        spots = [i for i, w in enumerate(words) if w.lower().strip(".,?:") in SYNONYMS]
        if spots:
            i = self.rng.choice(spots)
            bare = words[i].strip(".,?:")
            new = self.rng.choice(SYNONYMS[bare.lower()])
            words[i] = words[i].replace(bare, new.capitalize() if bare[0].isupper() else new)
        return " ".join(words)

    def paraphrase(self, text: str, slots: dict) -> str:
        r = self.rng
        for _ in range(r.choice([1, 1, 2, 2, 3])):
            op = r.random()
            words = text.split(" ")
            if op < 0.30:  # synonym swap
                text = self.swap_synonym(text)
            elif op < 0.45:  # add a clause
                text = f"{text} {r.choice(CLAUSES)}"
            elif op < 0.55:  # reorder: move the last clause or phrase to the front
                if ". " in text:
                    head, tail = text.split(". ", 1)
                    text = f"{tail.rstrip('.')}. {head}."
                elif " for " in text:
                    head, tail = text.rstrip(".?").rsplit(" for ", 1)
                    text = f"For {tail}, {head[0].lower()}{head[1:]}."
            elif op < 0.65:  # near copy: case and punctuation
                text = r.choice([text.lower(), text.upper(), text.rstrip(".?!") + "!", text.replace(" ", "  ")])
            elif op < 0.75:  # drop a word
                if len(words) > 4:
                    del words[r.randrange(1, len(words))]
                text = " ".join(words)
            elif op < 0.85:  # polite prefix
                text = f"{r.choice(PREFIXES)} {text[0].lower()}{text[1:]}"
            else:  # the same request in another template
                text = self.fill(self.template(), slots)
        return text


def instructions(n: int, seed: int = 0, repeat: float = 0.25) -> list[str]:
    """``n`` instructions; about ``repeat`` of them are paraphrases of earlier ones."""
    g = _Generator(seed)
    made: list[tuple[str, dict]] = []
    out = []
    for _ in range(n):
        if made and g.rng.random() < repeat:
            # teachers mostly repeat what they wrote lately
            back = min(len(made), int(g.rng.expovariate(1 / 200)) + 1)
            text, slots = made[-back] if g.rng.random() < 0.8 else g.rng.choice(made)
            text = g.paraphrase(text, slots)
        else:
            text, slots = g.fresh()
        made.append((text, slots))
        if len(made) > 100_000:  # bound memory for the 1M set; old ones are rarely repeated anyway
            del made[:50_000]
        out.append(text)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("n", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jsonl", action="store_true", help="one {instruction} object per line")
    a = p.parse_args()
    for text in instructions(a.n, a.seed):
        print(json.dumps({"instruction": text}) if a.jsonl else text)


if __name__ == "__main__":
    main()

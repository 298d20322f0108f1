"""Hand-written synthetic conversations for demos, load tests and smoke tests without a data set.

Twelve short conversations in the registers erc-stream is meant for (customer-support chats, call-centre
transcripts, social-media comment threads), every turn labelled with a raw MELD label so replays carry a
gold label that ``LABEL_SETS["meld"].map_gold`` understands.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from core.records import ChatMessage
from model_store.data import Conversation, Utterance

DATASET = "synthetic"
MELD_RAW_LABELS: tuple[str, ...] = ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear")

# (slug, turns); a turn is (speaker, text, raw MELD label).
_Turn = tuple[str, str, str]
_TEMPLATES: tuple[tuple[str, tuple[_Turn, ...]], ...] = (
    ("late-delivery", (
        ("Customer", "Hi, my order was supposed to arrive on Monday and it's now Thursday.", "neutral"),
        ("Agent", "Sorry about that! Could you share your order number so I can take a look?", "neutral"),
        ("Customer", "It's 48213. This is the third time this has happened, honestly.", "anger"),
        ("Agent", "I see it: the parcel got stuck at the regional hub. I've reshipped it with express delivery.",
         "neutral"),
        ("Customer", "Oh, that's quicker than I expected. When will it get here?", "surprise"),
        ("Agent", "Tomorrow before noon, and I've refunded the shipping fee.", "neutral"),
        ("Customer", "Great, thank you so much!", "joy"),
    )),
    ("double-charge", (
        ("Caller", "Yes, hello, I've been charged twice for the same bill this month.", "anger"),
        ("Rep", "I'm sorry to hear that. Let me pull up your account.", "neutral"),
        ("Caller", "I'm on a fixed income, that money was for groceries.", "sadness"),
        ("Rep", "I understand. I can see both payments, and the second one is already flagged as a duplicate.",
         "neutral"),
        ("Caller", "Wait, really? So I don't have to fight for it?", "surprise"),
        ("Rep", "No, it will be back in your account within two business days.", "neutral"),
        ("Caller", "Oh thank goodness. Thank you, dear.", "joy"),
    )),
    ("password-reset", (
        ("User", "I can't log in, the reset link says it has expired.", "neutral"),
        ("Support", "Those links last 15 minutes. I've just sent you a fresh one.", "neutral"),
        ("User", "Got it. Same error again!! I clicked it straight away.", "anger"),
        ("Support", "Are you opening it in the same browser where you requested it?", "neutral"),
        ("User", "Ah, no, it opened in my phone's mail app. Trying on the laptop now.", "neutral"),
        ("User", "That worked! I'm in.", "joy"),
    )),
    ("product-launch-thread", (
        ("@mika_r", "Just watched the launch stream. They finally added offline mode!", "joy"),
        ("@dev_null42", "Wait, offline mode for everyone or only the pro tier?", "surprise"),
        ("@mika_r", "Pro only, apparently.", "neutral"),
        ("@dev_null42", "Of course. Paywalling a basic feature is just gross.", "disgust"),
        ("@sunnyside", "Still better than nothing, I've been asking for this for two years.", "neutral"),
        ("@dev_null42", "Fair. I'm still annoyed though.", "anger"),
    )),
    ("account-hacked", (
        ("Customer", "Someone changed the email on my account and I got a login alert from another country.",
         "fear"),
        ("Agent", "Let's secure it right away. I've locked the account and signed out every session.", "neutral"),
        ("Customer", "My card is saved on there. Could they have used it?", "fear"),
        ("Agent", "No purchases were made since the change. I'll send a reset link to your original email.",
         "neutral"),
        ("Customer", "Okay. I'm so relieved, my hands are still shaking.", "joy"),
    )),
    ("broken-blender", (
        ("Caller", "The blender I bought last week started smoking the second time I used it.", "fear"),
        ("Agent", "Please unplug it and don't use it again. Are you alright?", "neutral"),
        ("Caller", "I'm fine, but the kitchen smells awful, like burnt plastic.", "disgust"),
        ("Agent", "I'm very sorry. I'll arrange a full refund and a courier to collect it.", "neutral"),
        ("Caller", "A refund? I figured I'd have to argue about the warranty.", "surprise"),
        ("Agent", "Not for a safety issue. You'll get a confirmation email in a few minutes.", "neutral"),
    )),
    ("pet-loss-thread", (
        ("@lena_k", "Had to say goodbye to our old dog Biscuit this morning. Sixteen years.", "sadness"),
        ("@tomwrites", "I'm so sorry, Lena. Sixteen years is a whole childhood.", "sadness"),
        ("@lena_k", "The house is so quiet. I keep expecting to hear his tail on the floor.", "sadness"),
        ("@priya.m", "Remember the picture of him stealing the birthday cake? Still makes me laugh.", "joy"),
        ("@lena_k", "Ha, he was so proud of himself. Thank you both.", "joy"),
    )),
    ("flight-cancelled", (
        ("Passenger", "My flight to Lisbon was just cancelled and the app shows no alternatives.", "anger"),
        ("Agent", "I'm sorry. I can see the cancellation. Give me a moment to search.", "neutral"),
        ("Passenger", "I have a wedding tomorrow afternoon. I'm the best man.", "fear"),
        ("Agent", "There's a seat on the 6:40 flight tomorrow morning via Madrid, landing at 11:15.", "neutral"),
        ("Passenger", "Oh wow, that actually works. Please book it!", "surprise"),
        ("Agent", "Done, your new boarding pass is in the app.", "neutral"),
        ("Passenger", "You just saved my whole weekend. Thank you!", "joy"),
    )),
    ("restaurant-review", (
        ("@foodie_sam", "Went to the new ramen place on Fifth. Found a hair in my broth.", "disgust"),
        ("@ramen_on_fifth", "We're really sorry, Sam. That's not acceptable. Could you DM us?", "neutral"),
        ("@jules_b", "Ew. I was going to go there this weekend.", "disgust"),
        ("@foodie_sam", "To be fair, the staff replaced it immediately and didn't charge me.", "neutral"),
        ("@ramen_on_fifth", "Thank you for saying so. Your next bowl is on us.", "neutral"),
        ("@jules_b", "Okay, that's a classy response. Maybe I'll still give it a try.", "joy"),
    )),
    ("internet-outage", (
        ("Caller", "The internet's been down since last night. I work from home.", "anger"),
        ("Tech", "I'm sorry. Can you tell me which lights are on on the router?", "neutral"),
        ("Caller", "Power is green, the globe one is blinking red.", "neutral"),
        ("Tech", "There's a fibre cut in your area. A crew is on site.", "neutral"),
        ("Caller", "Do you have any idea how long? I have a client call at two.", "fear"),
        ("Tech", "The estimate is noon. I'll add a credit for the whole day to your bill.", "neutral"),
        ("Caller", "Alright. Thanks for being straight with me.", "neutral"),
    )),
    ("job-news-thread", (
        ("@arjun.codes", "After 40 applications I finally got an offer!! Starting in March.", "joy"),
        ("@kate_h", "No way, congratulations!! Where?", "surprise"),
        ("@arjun.codes", "The robotics startup I told you about. Still can't believe it.", "joy"),
        ("@marco_v", "So happy for you, man. You earned it.", "joy"),
        ("@kate_h", "Drinks on Friday to celebrate?", "joy"),
    )),
    ("subscription-cancel", (
        ("Customer", "I want to cancel my gym membership.", "neutral"),
        ("Agent", "I can help with that. May I ask why you're leaving?", "neutral"),
        ("Customer", "I moved to another city. I already told the front desk twice.", "anger"),
        ("Agent", "I see the notes. Unfortunately the contract requires a 30-day notice.", "neutral"),
        ("Customer", "So I'm paying for a gym four hundred kilometres away? That's ridiculous.", "disgust"),
        ("Agent", "I'll waive the notice period since you asked in person before. It's cancelled today.", "neutral"),
        ("Customer", "Oh. Okay, I didn't expect that. Thanks.", "surprise"),
    )),
)


def templates() -> list[Conversation]:
    """The hand-written conversations, once each, with their slugs as conversation ids."""
    return [
        Conversation(DATASET, slug, tuple(Utterance(s, t, label) for s, t, label in turns))
        for slug, turns in _TEMPLATES
    ]


def synthetic_conversations(n: int, seed: int = 0) -> list[Conversation]:
    """``n`` conversations cycling through the templates, each pass in a seed-shuffled order.

    Conversation ids are distinct (``"{index:06d}-{slug}"``), so a replay never merges two conversations.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, not {n}")
    base = templates()
    rng = random.Random(seed)
    out: list[Conversation] = []
    while len(out) < n:
        order = list(base)
        rng.shuffle(order)
        for conv in order[: n - len(out)]:
            out.append(Conversation(DATASET, f"{len(out):06d}-{conv.conversation_id}", conv.utterances))
    return out


#: A conversation that turns sour at once and stays there: five angry turns by one customer. The demo sends
#: it to show the negative-streak alert (exactly one per streak). It starts angry, so no shift-to-anger alert.
_NEGATIVE_STREAK: tuple[_Turn, ...] = (
    ("Customer", "This is the third time my internet has gone down this week. I am furious!", "anger"),
    ("Customer", "I'm sick and tired of your useless excuses. Fix it now!", "anger"),
    ("Customer", "You people are incompetent. I'm absolutely livid!", "anger"),
    ("Customer", "This is outrageous! I want to cancel everything right now!", "anger"),
    ("Customer", "I am so angry I could scream. Worst service ever!", "anger"),
)
NEGATIVE_STREAK_ID = "negative-streak"


def negative_streak_conversation() -> Conversation:
    """The scripted negative streak (conversation id ``negative-streak``)."""
    return Conversation(DATASET, NEGATIVE_STREAK_ID, tuple(Utterance(s, t, label) for s, t, label in _NEGATIVE_STREAK))


#: A support call: the customer's anger keeps building while the agent answers calmly between. With the
#: negative-streak rule limited to the customer's turns (``alerts.streak_roles``), it raises exactly one alert;
#: counting every turn, the agent's calm replies would break the streak each time.
_CALL_CENTER: tuple[tuple[str, str, str, str], ...] = (
    ("Dana", "customer", "My card was charged twice and nobody answers my emails. I'm furious!", "anger"),
    ("Agent", "agent", "Thank you for calling. Let me look into that for you.", "neutral"),
    ("Dana", "customer", "I've been waiting forty minutes. This is outrageous!", "anger"),
    ("Agent", "agent", "I understand. I can see both charges on your account.", "neutral"),
    ("Dana", "customer", "Then refund it right now! I am absolutely livid!", "anger"),
    ("Agent", "agent", "I have started the refund; it takes three to five days.", "neutral"),
    ("Dana", "customer", "Five days?! This is the worst service I have ever had!", "anger"),
)
CALL_CENTER_ID = "support-call"


def call_center_messages(run_id: str, *, tenant: str | None, start: datetime | None = None) -> list[ChatMessage]:
    """The scripted support call as schema-version-2 messages: roles, no turn numbers (the consumer numbers
    them by arrival), message ids numbered per conversation as call-center systems do ("1", "2", ...)."""
    start = start or datetime.now(UTC)
    conversation_id = f"{run_id}:{CALL_CENTER_ID}"
    return [ChatMessage(schema_version=2, message_id=str(i + 1), conversation_id=conversation_id, speaker=speaker,
                        role=role, text=text, sent_at=start + timedelta(seconds=4 * i), tenant=tenant,
                        gold_label=label)
            for i, (speaker, role, text, label) in enumerate(_CALL_CENTER)]


def scripted_conversations() -> list[Conversation]:
    """Every hand-written conversation once (the templates, the negative streak, the support call; 86 labelled
    turns): ``erc-stream models eval --dataset synthetic`` scores an adapter on them, the registers of the
    product's streams that MELD's TV dialogue is not."""
    call = Conversation(DATASET, CALL_CENTER_ID, tuple(Utterance(s, t, label) for s, _, t, label in _CALL_CENTER))
    return [*templates(), negative_streak_conversation(), call]

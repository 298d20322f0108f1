"""Send one chat message to erc-stream and print its emotion event (kafka-python, nothing else).

    pip install kafka-python
    python send_and_read.py --bootstrap 127.0.0.1:9092

The message is JSON on the input topic, keyed by its conversation (so a conversation's turns stay in order on
one partition); the event arrives on the output topic with the same message_id.
"""

import argparse
import json
import time
import uuid
from datetime import datetime, timezone

from kafka import KafkaConsumer, KafkaProducer

parser = argparse.ArgumentParser()
parser.add_argument("--bootstrap", default="127.0.0.1:9092")
parser.add_argument("--input-topic", default="chat.messages")
parser.add_argument("--output-topic", default="chat.emotions")
parser.add_argument("--text", default="I have been on hold for an hour and nobody can tell me where my refund is!")
parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the event")
args = parser.parse_args()

message = {
    "schema_version": 2,  # version 2: `turn` is optional (numbered by arrival), `role` and `reply_to` exist
    "message_id": str(uuid.uuid4()),
    "conversation_id": "quickstart-1",
    "speaker": "customer-42",
    "role": "customer",
    "text": args.text,
    "sent_at": datetime.now(timezone.utc).isoformat(),
}

# Read from the end of the output topic before sending, so the event cannot be missed.
consumer = KafkaConsumer(args.output_topic, bootstrap_servers=args.bootstrap, auto_offset_reset="latest",
                         enable_auto_commit=False, group_id=None, consumer_timeout_ms=1000)
deadline = time.monotonic() + args.timeout
while not consumer.assignment():  # the topic's partitions, once its metadata arrives
    if time.monotonic() > deadline:
        raise SystemExit(f"topic {args.output_topic} not found on {args.bootstrap}")
    consumer.poll(timeout_ms=500)
for partition in consumer.assignment():
    consumer.position(partition)  # fixes the starting offset now: the end of the topic

producer = KafkaProducer(bootstrap_servers=args.bootstrap, acks="all")
producer.send(args.input_topic, key=message["conversation_id"].encode(), value=json.dumps(message).encode())
producer.flush()
print("sent", message["message_id"])

deadline = time.monotonic() + args.timeout
while time.monotonic() < deadline:
    for record in consumer:
        event = json.loads(record.value)
        if event.get("message_id") == message["message_id"]:
            print(json.dumps(event, indent=2))
            raise SystemExit(0)
raise SystemExit(f"no event for {message['message_id']} within {args.timeout:.0f} s")

"""A single-call agent: ask the question through the OpenAI client, reward the right number."""
from agent_helpers import MODEL, last_number


async def run(task_row, client):
    reply = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "You are a calculator. Reply with the result only."},
                               {"role": "user", "content": task_row["prompt"]}])
    return 1.0 if last_number(reply.choices[0].message.content) == str(task_row["answer"]) else 0.0

"""A two-step agent: plan first, then answer with the plan in the conversation. The second call
extends the first exchange, so forkrl trains both replies as one multi-turn trajectory."""
from agent_helpers import MODEL, last_number


async def run(task_row, client):
    messages = [{"role": "system", "content": "You are a careful calculator."},
                {"role": "user", "content": f"{task_row['prompt']}\nFirst say in a few words how to compute it."}]
    plan = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=32)
    messages += [{"role": "assistant", "content": plan.choices[0].message.content},
                 {"role": "user", "content": "Now reply with the result only."}]
    answer = await client.chat.completions.create(model=MODEL, messages=messages)
    return 1.0 if last_number(answer.choices[0].message.content) == str(task_row["answer"]) else 0.0

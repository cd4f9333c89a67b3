"""Two roles, one policy: a solver answers, a verifier (a separate conversation) judges the answer.
The episode is rewarded for a right answer and for a verifier that judges it correctly; the two
roles' calls do not extend each other, so they train as two trajectories of the episode."""
from agent_helpers import MODEL, last_number
from openai import OpenAI


def run(task_row, client: OpenAI):   # a plain function gets a synchronous client
    solved = client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "You are a calculator. Reply with the result only."},
                               {"role": "user", "content": task_row["prompt"]}])
    answer = last_number(solved.choices[0].message.content)
    verdict = client.chat.completions.create(
        model=MODEL, max_tokens=4,
        messages=[{"role": "system", "content": "You check answers. Reply yes or no."},
                  {"role": "user", "content": f"{task_row['prompt']}\nProposed answer: {answer}\nIs it right?"}])
    right = answer == str(task_row["answer"])
    says_right = "yes" in verdict.choices[0].message.content.lower()
    return (1.0 if right else 0.0) + (0.25 if says_right == right else 0.0)

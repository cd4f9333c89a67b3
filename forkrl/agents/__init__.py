"""Agent programs: any program written against the OpenAI chat API, trained through a local endpoint
that serves the policy and records the exact tokens, log-probs and entropies of every call.

    endpoint.py  PolicyEndpoint: /v1/chat/completions on 127.0.0.1 with a per-run key, batching
                 concurrent requests into the engine
    recorder.py  EpisodeRecorder: calls per episode, exact-token continuation, calls -> trajectories
    program.py   the `agent_program` sampler: episodes of `module:function`, rewards from its return
"""
from forkrl.agents.endpoint import PolicyEndpoint
from forkrl.agents.recorder import EpisodeRecorder

__all__ = ["EpisodeRecorder", "PolicyEndpoint"]

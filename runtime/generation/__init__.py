"""Algorithms over a loaded model: sampling, the token loop, OpenAI-shaped results, perplexity.

They take the model as an argument and use only its public methods, so this layer sits
below runtime.model (whose convenience methods call into it) and imports nothing above
runtime.base.
"""

from runtime.generation.conversation import Conversation, Notice
from runtime.generation.loop import Piece, StopStrings, complete, generate, greedy_tokens, sampling_params
from runtime.generation.responses import chat_response, completion_response
from runtime.generation.sampling import Sampler, SamplingParams

__all__ = ["Conversation", "Notice", "Piece", "Sampler", "SamplingParams", "StopStrings", "chat_response", "complete",
           "completion_response", "generate", "greedy_tokens", "sampling_params"]

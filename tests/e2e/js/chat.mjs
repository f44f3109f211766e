// One non-streaming and one streaming chat completion with the official openai npm package.
// Usage: OPENAI_BASE_URL=http://127.0.0.1:8000/v1 OPENAI_API_KEY=... node chat.mjs
// Prints one JSON line with what the SDK returned; pytest asserts on it.
import OpenAI from "openai";

const client = new OpenAI({ baseURL: process.env.OPENAI_BASE_URL, apiKey: process.env.OPENAI_API_KEY || "none" });
const messages = [{ role: "user", content: "What is the capital of France?" }];

const completion = await client.chat.completions.create({
  model: "electron", messages, temperature: 0, max_tokens: 24,
});

const stream = await client.chat.completions.create({
  model: "electron", messages, temperature: 0, max_tokens: 24, stream: true,
  stream_options: { include_usage: true },
});
let streamed = "";
let usage = null;
let finish = null;
let chunks = 0;
for await (const chunk of stream) {
  chunks += 1;
  if (chunk.usage) usage = chunk.usage;
  for (const choice of chunk.choices) {
    streamed += choice.delta?.content ?? "";
    if (choice.finish_reason) finish = choice.finish_reason;
  }
}
console.log(JSON.stringify({
  content: completion.choices[0].message.content,
  finish_reason: completion.choices[0].finish_reason,
  usage: completion.usage,
  streamed, stream_finish_reason: finish, stream_usage: usage, chunks,
}));

// A Node.js client of lorapool.v1.LoraPoolService on stock @grpc/grpc-js and
// @grpc/proto-loader, loading the API from protos/lorapool/v1/lorapool.proto.
//
// It shows a streamed Generate, token ids as input (note the TokenIds wrapper:
// {input_ids: {ids: [...]}}), cancelling a stream, a deadline, and reading the
// machine-readable reason (google.rpc.ErrorInfo) and field (google.rpc.BadRequest)
// of an error from the grpc-status-details-bin trailer.
//
//   npm ci && node client.js [host:port]      (default: $LORAPOOL_TARGET or localhost:50051)
//
// A server with an API key: set LORAPOOL_API_KEY. The adapter used is adapter-001,
// one of the demo adapters `lorapool serve` offers without --model.

'use strict';

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const PROTO = path.resolve(__dirname, '../../protos/lorapool/v1/lorapool.proto');
const TARGET = process.argv[2] || process.env.LORAPOOL_TARGET || 'localhost:50051';
const ADAPTER = process.env.LORAPOOL_ADAPTER || 'adapter-001';

// keepCase: field names as in the .proto (max_new_tokens, not maxNewTokens);
// enums as their names; 64-bit integers as strings (JavaScript numbers lose bits).
const definition = protoLoader.loadSync(PROTO, {
  keepCase: true,
  enums: String,
  longs: String,
  defaults: false,
  oneofs: true,
});
const { LoraPoolService } = grpc.loadPackageDefinition(definition).lorapool.v1;

// -- error details ------------------------------------------------------------------
// A failed call's trailer grpc-status-details-bin holds a google.rpc.Status whose
// details are Any messages; lorapool sends an ErrorInfo (reason, metadata) with every
// error and a BadRequest (field violations) with INVALID_ARGUMENT. The three messages
// are small enough to declare here instead of fetching googleapis' protos.
const RPC_TYPES = protobuf.parse(`
  syntax = "proto3";
  package google.rpc;
  message Any { string type_url = 1; bytes value = 2; }
  message Status { int32 code = 1; string message = 2; repeated Any details = 3; }
  message ErrorInfo { string reason = 1; string domain = 2; map<string, string> metadata = 3; }
  message BadRequest {
    message FieldViolation { string field = 1; string description = 2; }
    repeated FieldViolation field_violations = 1;
  }
`, { keepCase: true }).root;

/** {reason, domain, metadata, fieldViolations} of a failed call (empty when none). */
function errorDetails(err) {
  const out = { reason: '', domain: '', metadata: {}, fieldViolations: [] };
  const [raw] = (err.metadata && err.metadata.get('grpc-status-details-bin')) || [];
  if (!raw) return out; // e.g. a deadline that expired on the client's side
  const status = RPC_TYPES.lookupType('google.rpc.Status').decode(raw);
  for (const detail of status.details) {
    const name = detail.type_url.slice(detail.type_url.lastIndexOf('/') + 1);
    if (name === 'google.rpc.ErrorInfo') {
      const info = RPC_TYPES.lookupType(name).decode(detail.value);
      Object.assign(out, { reason: info.reason, domain: info.domain, metadata: info.metadata });
    } else if (name === 'google.rpc.BadRequest') {
      const bad = RPC_TYPES.lookupType(name).decode(detail.value);
      out.fieldViolations = bad.field_violations.map((v) => v.field);
    }
  }
  return out;
}

const STATUS_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([k, v]) => [v, k]));

// -- calls ----------------------------------------------------------------------------

function callMetadata() {
  const md = new grpc.Metadata();
  if (process.env.LORAPOOL_API_KEY) md.set('x-api-key', process.env.LORAPOOL_API_KEY);
  return md;
}

/** Reads a Generate stream to its end: {messages, tokens, last} or the error. If
 *  `cancelAfter` messages have arrived, the call is cancelled. */
function readStream(client, request, { deadline, cancelAfter } = {}) {
  return new Promise((resolve) => {
    const options = deadline ? { deadline } : {};
    const call = client.Generate(request, callMetadata(), options);
    const seen = { messages: 0, tokens: [], last: null, error: null };
    call.on('data', (msg) => {
      seen.messages += 1;
      seen.tokens.push(...msg.token_ids);
      seen.last = msg;
      if (cancelAfter && seen.messages === cancelAfter) call.cancel();
    });
    call.on('error', (err) => resolve({ ...seen, error: err }));
    call.on('end', () => resolve(seen));
  });
}

function unary(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, callMetadata(), { deadline: Date.now() + 30_000 }, (err, reply) =>
      err ? reject(err) : resolve(reply),
    );
  });
}

function expect(condition, what) {
  if (!condition) throw new Error(`unexpected: ${what}`);
}

// -- the walk-through -----------------------------------------------------------------

async function main() {
  const client = new LoraPoolService(TARGET, grpc.credentials.createInsecure());

  // 1. A streamed generation: one message per step, the last with finish_reason and usage.
  const story = await readStream(client, {
    prompt: 'Once upon a time',
    adapter_id: ADAPTER,
    params: { max_new_tokens: 8, ignore_eos: true, temperature: 0 },
  });
  expect(!story.error, story.error && story.error.details);
  console.log(
    `generate: ${story.tokens.length} tokens in ${story.messages} messages, ` +
      `finish ${story.last.finish_reason}, text ${JSON.stringify(story.last.text)}`,
  );

  // 2. Token ids as input. input_ids is a TokenIds message (a oneof cannot hold a
  //    repeated field): {input_ids: {ids: [...]}}. A bare array, {input_ids: [5, 6]},
  //    is dropped by the encoder: the server sees an empty input_ids and answers
  //    INVALID_ARGUMENT naming the field input_ids.ids.
  const ids = await unary(client, 'Complete', {
    input_ids: { ids: [5, 6, 7, 8] },
    params: { max_new_tokens: 4, ignore_eos: true },
  });
  console.log(
    `input_ids: ${ids.usage.prompt_tokens} prompt tokens, ${ids.token_ids.length} generated`,
  );

  // 3. Cancellation: stop a long stream after 3 messages; the server frees the request.
  const long = { input_ids: { ids: [5, 6, 7] }, params: { max_new_tokens: 2000, ignore_eos: true } };
  const cancelled = await readStream(client, long, { cancelAfter: 3 });
  expect(cancelled.error && cancelled.error.code === grpc.status.CANCELLED, 'not cancelled');
  let stats = await unary(client, 'GetStats', {});
  for (let i = 0; i < 50 && (stats.running_requests || 0) > 0; i += 1) {
    await new Promise((r) => setTimeout(r, 100));
    stats = await unary(client, 'GetStats', {});
  }
  console.log(
    `cancel: ${STATUS_NAMES[cancelled.error.code]} after ${cancelled.messages} messages, ` +
      `server running_requests ${stats.running_requests || 0}`,
  );

  // 4. A deadline: 250 ms for a generation that needs longer ends DEADLINE_EXCEEDED
  //    (the server stops generating, too).
  const late = await readStream(client, long, { deadline: Date.now() + 250 });
  expect(late.error && late.error.code === grpc.status.DEADLINE_EXCEEDED, 'no deadline error');
  console.log(`deadline: ${STATUS_NAMES[late.error.code]} after ${late.messages} messages`);

  // 5. Errors: the status code says what kind, ErrorInfo.reason says which, its
  //    metadata and BadRequest say about what.
  const missing = await readStream(client, { prompt: 'hi', adapter_id: 'no-such-adapter' });
  const notFound = errorDetails(missing.error);
  console.log(
    `error: ${STATUS_NAMES[missing.error.code]} reason ${notFound.reason} ` +
      `adapter_id ${notFound.metadata.adapter_id}`,
  );
  const bad = await readStream(client, { prompt: 'hi', params: { temperature: -1 } });
  const invalid = errorDetails(bad.error);
  console.log(
    `error: ${STATUS_NAMES[bad.error.code]} reason ${invalid.reason} ` +
      `fields ${invalid.fieldViolations.join(',')}`,
  );

  client.close();
}

main().catch((err) => {
  console.error(`example failed: ${err.message}`);
  process.exit(1);
});

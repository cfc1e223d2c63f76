'use strict';
// Load generator for the bridge benchmark (driven by tools/loadtest.py, one process per level).
//
// One Node process plays both ends so both share one clock:
//   - N fake Twilio Media Streams clients: POST /twiml, open the <Stream url>, send connected +
//     start, then a unique 160-byte mu-law frame every 20 ms (bytes 0-1 = call index, 2-5 =
//     sequence number, so every payload is unique and decodable from its first 8 base64 chars);
//   - the echo fake Voice Agent (WebSocket server): session.update -> session.ready + reply.started,
//     every input.audio echoed at once as reply.audio with the identical string, and now and then
//     input.speech.started (+ reply.done interrupted, reply.started new) to time the Twilio `clear`.
//
// Latency: Twilio->agent = fake Twilio sends `media` -> fake agent receives the matching
// `input.audio`; agent->Twilio = fake agent sends `reply.audio` -> fake Twilio receives the
// matching `media`. Percentiles only cover frames *sent* in the steady window (after every call
// is up); loss covers every frame of the level.
//
// Loss accounting is exact:
//   - caller frames the bridge drops before session.ready (documented behaviour) are those with a
//     sequence number below the first one the agent receives: counted as `pre_ready`, not lost;
//   - echoes still in flight when Twilio receives a `clear` belong to the interrupted reply and are
//     never played (the bridge drops them by epoch): counted as `cleared`, not lost. A new
//     speech.started is only sent once the previous clear has arrived.
//
// Output: JSON lines on stdout: {"event":"listening"}, {"event":"steady_start"},
// {"event":"steady_end"}, then {"event":"result", ...}. Latency histograms have 10 us bins.

const http = require('http');
const { WebSocket, WebSocketServer } = require('ws');
const { performance, monitorEventLoopDelay } = require('perf_hooks');

const now = () => performance.now();

function parseArgs(argv) {
  const opts = {
    server: 'http://127.0.0.1:3000',
    agentPort: 0,
    calls: 10,
    duration: 10,
    ramp: -1,
    settle: 1,
    drain: 2,
    speechEvery: 2,
    agentOnly: false,
    seed: 1,
  };
  for (let i = 2; i < argv.length; i++) {
    const key = argv[i].replace(/^--/, '').replace(/-([a-z])/g, (_, c) => c.toUpperCase());
    if (key === 'agentOnly') { opts.agentOnly = true; continue; }
    const value = argv[++i];
    opts[key] = typeof opts[key] === 'number' ? Number(value) : value;
  }
  if (opts.ramp < 0) opts.ramp = Math.max(1, opts.calls / 100); // ~100 call set-ups per second
  return opts;
}

const opts = parseArgs(process.argv);
const emit = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');

// --- payloads ------------------------------------------------------------------------------------

const B64 = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/';
const B64INV = new Int16Array(128).fill(-1);
for (let i = 0; i < 64; i++) B64INV[B64.charCodeAt(i)] = i;
// 6 header bytes = exactly 8 base64 chars, so the 154-byte tail encodes on its own: 8 + 208 = 216.
const TAIL = Buffer.alloc(154, 0xff).toString('base64');

function header(call, seq) {
  const n1 = ((call >> 8) & 255) << 16 | (call & 255) << 8 | ((seq >>> 24) & 255);
  const n2 = ((seq >>> 16) & 255) << 16 | ((seq >>> 8) & 255) << 8 | (seq & 255);
  return B64[(n1 >> 18) & 63] + B64[(n1 >> 12) & 63] + B64[(n1 >> 6) & 63] + B64[n1 & 63] +
    B64[(n2 >> 18) & 63] + B64[(n2 >> 12) & 63] + B64[(n2 >> 6) & 63] + B64[n2 & 63];
}
function payloadFor(call, seq) { return header(call, seq) + TAIL; }

// Returns [call, seq] decoded from the first 8 chars, or null.
function decode(s, at) {
  let n1 = 0, n2 = 0;
  for (let i = 0; i < 4; i++) {
    const a = B64INV[s.charCodeAt(at + i) & 127], b = B64INV[s.charCodeAt(at + 4 + i) & 127];
    if (a < 0 || b < 0) return null;
    n1 = (n1 << 6) | a; n2 = (n2 << 6) | b;
  }
  const call = (n1 >> 8) & 0xffff;
  const seq = ((n1 & 255) * 16777216) + n2;
  return [call, seq];
}

// --- stats ---------------------------------------------------------------------------------------

class Hist {
  constructor() { this.bins = new Map(); this.n = 0; this.max = 0; }
  add(ms) {
    const b = Math.round(ms * 100); // 10 us bins
    this.bins.set(b, (this.bins.get(b) || 0) + 1);
    this.n++;
    if (ms > this.max) this.max = ms;
  }
  toJSON() {
    return { n: this.n, max_ms: this.max, bin_ms: 0.01, bins: [...this.bins.entries()].sort((a, b) => a[0] - b[0]) };
  }
}

const lat = { toAgent: new Hist(), toTwilio: new Hist(), clear: new Hist(), setup: new Hist() };
const maxAll = { toAgent: 0, toTwilio: 0 };
const counters = {
  calls_started: 0, calls_live: 0, calls_failed: 0, calls_closed_early: 0,
  ta_sent: 0, ta_received: 0, ta_duplicate: 0, ta_corrupt: 0,
  tt_sent: 0, tt_received: 0, tt_duplicate: 0, tt_corrupt: 0, tt_cleared: 0,
  speech_sent: 0, clears: 0, clears_unmatched: 0,
  agent_sessions: 0, agent_unknown_audio: 0,
};
const failures = [];

// --- timeline ------------------------------------------------------------------------------------

const T0 = now() + 300; // leave a moment for the agent to listen
const steadyStartT = T0 + (opts.ramp + opts.settle) * 1000;
const steadyEndT = steadyStartT + opts.duration * 1000;
let streaming = true;
let speechOn = true;
const FRAME_MS = 20;
const CAP = Math.ceil((opts.ramp + opts.settle + opts.duration + 2) * 1000 / FRAME_MS) + 200;

// --- fake Twilio calls ---------------------------------------------------------------------------

const hex = (n) => { let s = ''; for (let i = 0; i < n; i++) s += '0123456789abcdef'[Math.floor(Math.random() * 16)]; return s; };
const httpAgent = new http.Agent({ keepAlive: true, maxSockets: 32 });
const serverUrl = new URL(opts.server);

const calls = [];

class Call {
  constructor(idx) {
    this.idx = idx;
    this.callSid = 'CA' + hex(32);
    this.streamSid = 'MZ' + hex(32);
    this.accountSid = 'AC' + hex(32);
    this.ws = null;
    this.live = false;
    this.stopped = false;
    this.seq = 0; // next sequence number to send
    this.nextAt = 0;
    this.postAt = 0;
    this.twSent = new Float64Array(CAP);
    this.agRecv = new Uint8Array(CAP);
    this.firstAgSeq = -1;
    this.agSentT = new Float64Array(CAP);
    this.agGen = new Uint32Array(CAP);
    this.twRecv = new Uint8Array(CAP); // 1 received, 2 cleared
    this.maxEcho = -1;
    this.scanFrom = 0;
    this.agent = null; // the agent-side connection of this call (known from its first audio)
    this.mediaPrefix = '';
  }
}

function postTwiml(call) {
  return new Promise((resolve, reject) => {
    const body = new URLSearchParams({
      CallSid: call.callSid, AccountSid: call.accountSid, From: '+15550100' + String(call.idx % 1000).padStart(3, '0'),
      To: '+15550199000', CallStatus: 'ringing', Direction: 'inbound', ApiVersion: '2010-04-01',
    }).toString();
    const req = http.request({
      host: serverUrl.hostname, port: serverUrl.port, path: '/twiml', method: 'POST', agent: httpAgent,
      headers: { 'content-type': 'application/x-www-form-urlencoded', 'content-length': Buffer.byteLength(body) },
    }, (res) => {
      let data = '';
      res.setEncoding('utf8');
      res.on('data', (d) => { data += d; });
      res.on('end', () => {
        const m = /<Stream[^>]*\surl="([^"]+)"/.exec(data);
        if (res.statusCode !== 200 || !m) reject(new Error(`POST /twiml: HTTP ${res.statusCode}: ${data.slice(0, 120)}`));
        else resolve(m[1].replace(/&amp;/g, '&'));
      });
    });
    req.on('error', reject);
    req.setTimeout(10000, () => req.destroy(new Error('POST /twiml timed out')));
    req.end(body);
  });
}

function fail(call, why) {
  counters.calls_failed++;
  if (failures.length < 10) failures.push(`call ${call.idx}: ${why}`);
}

async function startCall(call) {
  counters.calls_started++;
  call.postAt = now();
  let url;
  try { url = await postTwiml(call); } catch (e) { fail(call, e.message); return; }
  const ws = new WebSocket(url, { perMessageDeflate: false, handshakeTimeout: 10000 });
  call.ws = ws;
  call.mediaPrefix = '{"event":"media","sequenceNumber":"';
  ws.on('open', () => {
    ws.send('{"event":"connected","protocol":"Call","version":"1.0.0"}');
    ws.send(JSON.stringify({
      event: 'start', sequenceNumber: '1', streamSid: call.streamSid,
      start: {
        accountSid: call.accountSid, streamSid: call.streamSid, callSid: call.callSid, tracks: ['inbound'],
        customParameters: {}, mediaFormat: { encoding: 'audio/x-mulaw', sampleRate: 8000, channels: 1 },
      },
    }));
    call.live = true;
    counters.calls_live++;
    call.nextAt = now();
    active.push(call);
  });
  ws.on('message', (data, isBinary) => onTwilioMessage(call, isBinary ? null : data.toString()));
  ws.on('error', (e) => { if (!call.live) fail(call, 'ws: ' + e.message); });
  ws.on('close', () => {
    if (call.live && !call.stopped) {
      counters.calls_closed_early++;
      if (failures.length < 10) failures.push(`call ${call.idx}: the bridge closed the stream early`);
    }
    call.live = false;
  });
}

const MEDIA_AT = '"payload":"';

function onTwilioMessage(call, s) {
  const t = now();
  if (s === null) { counters.tt_corrupt++; return; }
  if (s.startsWith('{"event":"media"')) {
    const at = s.indexOf(MEDIA_AT);
    if (at < 0) { counters.tt_corrupt++; return; }
    const start = at + MEDIA_AT.length;
    const end = s.indexOf('"', start);
    const d = decode(s, start);
    if (d === null || d[0] !== call.idx || d[1] >= CAP) { counters.tt_corrupt++; return; }
    const seq = d[1];
    if (end - start !== 216 || s.slice(start, end) !== payloadFor(call.idx, seq) || call.agSentT[seq] === 0) {
      counters.tt_corrupt++; return;
    }
    if (call.twRecv[seq] === 1) { counters.tt_duplicate++; return; }
    call.twRecv[seq] = 1;
    counters.tt_received++;
    const ms = t - call.agSentT[seq];
    if (ms > maxAll.toTwilio) maxAll.toTwilio = ms;
    if (call.agSentT[seq] >= steadyStartT) lat.toTwilio.add(ms);
    return;
  }
  let msg;
  try { msg = JSON.parse(s); } catch (e) { counters.tt_corrupt++; return; }
  if (msg.event === 'clear') {
    counters.clears++;
    const agent = call.agent;
    if (agent && agent.speechAt > 0) {
      lat.clear.add(t - agent.speechAt);
      agent.speechAt = 0;
      // Echoes of the interrupted reply still in flight will never be played: not lost.
      let lowest = -1;
      for (let seq = call.scanFrom; seq <= call.maxEcho; seq++) {
        if (call.agSentT[seq] === 0 || call.twRecv[seq] !== 0) continue;
        if (call.agGen[seq] < agent.gen) { call.twRecv[seq] = 2; counters.tt_cleared++; } else if (lowest < 0) lowest = seq;
      }
      call.scanFrom = lowest < 0 ? call.maxEcho + 1 : lowest;
    } else {
      counters.clears_unmatched++; // e.g. the second clear the bridge sends for reply.done(interrupted)
    }
  }
}

function sendMedia(call, t) {
  const seq = call.seq;
  if (seq >= CAP) return false;
  call.twSent[seq] = t;
  call.ws.send(call.mediaPrefix + (seq + 2) + '","streamSid":"' + call.streamSid +
    '","media":{"track":"inbound","chunk":"' + (seq + 1) + '","timestamp":"' + (seq * FRAME_MS) +
    '","payload":"' + payloadFor(call.idx, seq) + '"}}');
  call.seq = seq + 1;
  counters.ta_sent++;
  return true;
}

const active = [];
function tick() {
  if (!streaming) return;
  const t = now();
  if (t >= steadyEndT) return;
  for (let i = 0; i < active.length; i++) {
    const call = active[i];
    if (!call.live) continue;
    let burst = 0;
    while (call.nextAt <= t && burst < 10) {
      if (!sendMedia(call, now())) break;
      call.nextAt += FRAME_MS;
      burst++;
    }
  }
}

// --- the echo fake Voice Agent -------------------------------------------------------------------

const AUDIO_PREFIX = '{"type":"input.audio","audio":"';
let agentSeq = 0;

class AgentConn {
  constructor(ws) {
    this.ws = ws;
    this.id = ++agentSeq;
    this.call = null;
    this.gen = 0;
    this.rid = `resp_${this.id}_0`;
    this.speechAt = 0;
    this.speechTimer = null;
    this.ended = false;
  }
  replyStarted() {
    this.ws.send('{"type":"reply.started","reply_id":"' + this.rid + '","item_id":"item_' + this.id + '_' + this.gen + '"}');
  }
  scheduleSpeech(first) {
    if (!speechOn || opts.speechEvery <= 0 || this.ended) return;
    const every = opts.speechEvery * 1000;
    const delay = first ? 500 + Math.random() * every : every * (0.5 + Math.random());
    this.speechTimer = setTimeout(() => this.speech(), delay);
  }
  speech() {
    this.speechTimer = null;
    if (!speechOn || this.ended || this.ws.readyState !== WebSocket.OPEN) return;
    if (this.speechAt > 0) { this.scheduleSpeech(false); return; } // previous clear still awaited
    const old = this.rid;
    this.gen++;
    this.rid = `resp_${this.id}_${this.gen}`;
    this.speechAt = now();
    counters.speech_sent++;
    this.ws.send('{"type":"input.speech.started","timestamp":' + (Date.now() / 1000) + '}');
    this.ws.send('{"type":"reply.done","reply_id":"' + old + '","status":"interrupted"}');
    this.replyStarted();
    this.scheduleSpeech(false);
  }
  onMessage(s) {
    const t = now();
    if (s.startsWith(AUDIO_PREFIX)) {
      const start = AUDIO_PREFIX.length;
      const d = decode(s, start);
      const call = d && d[0] < calls.length ? calls[d[0]] : null;
      if (call === null || d[1] >= CAP || s.length !== start + 216 + 2 || call.twSent[d[1]] === 0) {
        counters.ta_corrupt++; return;
      }
      const seq = d[1];
      const payload = s.slice(start, start + 216);
      if (payload !== payloadFor(call.idx, seq)) { counters.ta_corrupt++; return; }
      if (this.call === null) {
        if (call.agent !== null) { counters.ta_corrupt++; return; }
        this.call = call;
        call.agent = this;
        lat.setup.add(t - call.postAt);
        this.scheduleSpeech(true);
      } else if (this.call !== call) { counters.ta_corrupt++; return; }
      if (call.agRecv[seq]) { counters.ta_duplicate++; return; }
      call.agRecv[seq] = 1;
      if (call.firstAgSeq < 0) call.firstAgSeq = seq;
      counters.ta_received++;
      const ms = t - call.twSent[seq];
      if (ms > maxAll.toAgent) maxAll.toAgent = ms;
      if (call.twSent[seq] >= steadyStartT) lat.toAgent.add(ms);
      // Echo at once, the identical base64 string.
      const ts = now();
      call.agSentT[seq] = ts;
      call.agGen[seq] = this.gen;
      if (seq > call.maxEcho) call.maxEcho = seq;
      counters.tt_sent++;
      this.ws.send('{"type":"reply.audio","reply_id":"' + this.rid + '","data":"' + payload + '"}');
      return;
    }
    let msg;
    try { msg = JSON.parse(s); } catch (e) { return; }
    if (msg.type === 'session.update' || msg.type === 'session.resume') {
      counters.agent_sessions++;
      this.ws.send(JSON.stringify({
        type: 'session.ready', session_id: `sess_${this.id.toString(16).padStart(8, '0')}`,
        expires_at: Math.floor(Date.now() / 1000) + 3600, resume_token: `rt_${this.id}`,
        config: { input: { type: 'audio', format: { encoding: 'audio/pcmu', sample_rate: 8000 } },
          output: { type: 'audio', voice: 'ivy', format: { encoding: 'audio/pcmu', sample_rate: 8000 } }, tools: [] },
      }));
      this.replyStarted();
    } else if (msg.type === 'session.end') {
      this.ended = true;
      if (this.speechTimer) clearTimeout(this.speechTimer);
      this.ws.send('{"type":"session.ended","session_duration_seconds":1.0,"audio_duration_seconds":null}');
      this.ws.close(1000);
    }
  }
}

const wss = new WebSocketServer({ host: '127.0.0.1', port: opts.agentPort, perMessageDeflate: false, maxPayload: 1 << 20 });
wss.on('connection', (ws) => {
  const conn = new AgentConn(ws);
  ws.on('message', (data, isBinary) => { if (!isBinary) conn.onMessage(data.toString()); });
  ws.on('close', () => { conn.ended = true; if (conn.speechTimer) clearTimeout(conn.speechTimer); });
  ws.on('error', () => {});
});

// --- run -----------------------------------------------------------------------------------------

const loopDelay = monitorEventLoopDelay({ resolution: 5 });

function summary() {
  // Twilio->agent: frames below the first one the agent received were dropped before session.ready.
  let preReady = 0;
  let neverReachedAgent = 0;
  let ttLost = 0;
  for (const call of calls) {
    const first = call.firstAgSeq < 0 ? 0 : call.firstAgSeq; // a call that never got through: all lost
    for (let seq = 0; seq < call.seq; seq++) {
      if (call.agRecv[seq]) continue;
      if (seq < first) preReady++; else neverReachedAgent++;
    }
    for (let seq = 0; seq <= call.maxEcho; seq++) {
      if (call.agSentT[seq] !== 0 && call.twRecv[seq] === 0) ttLost++;
    }
  }
  return {
    event: 'result',
    calls: opts.calls,
    duration_s: opts.duration,
    ramp_s: opts.ramp,
    counters,
    to_agent: {
      sent: counters.ta_sent, received: counters.ta_received, pre_ready: preReady, lost: neverReachedAgent,
      duplicate: counters.ta_duplicate, corrupt: counters.ta_corrupt, max_all_ms: maxAll.toAgent, lat: lat.toAgent.toJSON(),
    },
    to_twilio: {
      sent: counters.tt_sent, received: counters.tt_received, cleared: counters.tt_cleared, lost: ttLost,
      duplicate: counters.tt_duplicate, corrupt: counters.tt_corrupt, max_all_ms: maxAll.toTwilio, lat: lat.toTwilio.toJSON(),
    },
    clear: {
      speech_sent: counters.speech_sent, clears: counters.clears, unmatched: counters.clears_unmatched,
      missing: calls.reduce((n, c) => n + (c.agent && c.agent.speechAt > 0 ? 1 : 0), 0), lat: lat.clear.toJSON(),
    },
    setup: lat.setup.toJSON(),
    gen_loop_delay_ms: {
      p50: loopDelay.percentile(50) / 1e6, p99: loopDelay.percentile(99) / 1e6, max: loopDelay.max / 1e6,
    },
    failures,
  };
}

async function main() {
  await new Promise((resolve) => wss.once('listening', resolve));
  emit({ event: 'listening', port: wss.address().port });
  if (opts.agentOnly) return; // serve the echo agent until killed (manual runs)
  while (now() < T0) await new Promise((r) => setTimeout(r, 10));
  loopDelay.enable();
  for (let i = 0; i < opts.calls; i++) calls.push(new Call(i));
  const spacing = opts.calls > 1 ? (opts.ramp * 1000) / opts.calls : 0;
  calls.forEach((call, i) => setTimeout(() => startCall(call), i * spacing));
  const ticker = setInterval(tick, 1);
  await new Promise((r) => setTimeout(r, steadyStartT - now()));
  emit({ event: 'steady_start', calls_live: counters.calls_live, calls_failed: counters.calls_failed });
  await new Promise((r) => setTimeout(r, Math.max(0, steadyEndT - now())));
  streaming = false;
  speechOn = false;
  clearInterval(ticker);
  emit({ event: 'steady_end' });
  await new Promise((r) => setTimeout(r, opts.drain * 1000)); // echoes and clears in flight
  loopDelay.disable();
  const result = summary();
  // Hang up: stop, then wait (bounded) for the bridge to close each stream.
  const closed = calls.filter((c) => c.ws).map((call) => new Promise((resolve) => {
    call.stopped = true;
    const ws = call.ws;
    if (ws.readyState !== WebSocket.OPEN) { resolve(); return; }
    ws.once('close', resolve);
    ws.send(JSON.stringify({ event: 'stop', sequenceNumber: String(call.seq + 2), streamSid: call.streamSid,
      stop: { accountSid: call.accountSid, callSid: call.callSid } }));
    setTimeout(() => { ws.terminate(); resolve(); }, 5000);
  }));
  const t = now();
  await Promise.all(closed);
  result.hangup_ms = now() - t;
  emit(result);
  wss.close();
  httpAgent.destroy();
  setTimeout(() => process.exit(0), 100);
}

main().catch((e) => { emit({ event: 'error', message: String(e && e.stack || e) }); process.exit(1); });

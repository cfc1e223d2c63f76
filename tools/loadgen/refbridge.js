'use strict';
// A minimal Node.js reference bridge, the shape of the official Node example: for the benchmark's
// `--vs "node tools/loadgen/refbridge.js"`, so ratios come from one run, and as a control that the
// load generator is not the bottleneck. NOT a product: no signatures, no tokens, no resume.
// Same env as the bridge: PORT, BIND_HOST, PUBLIC_HOSTNAME/HOSTNAME, VOICE_AGENT_URL, ASSEMBLYAI_API_KEY.
//
// Twilio `media` -> `input.audio` (after session.ready); `reply.audio` -> Twilio `media`;
// `input.speech.started` -> `clear`; `stop` -> `session.end`.

const http = require('http');
const { WebSocket, WebSocketServer } = require('ws');

const port = Number(process.env.PORT || 3000);
const host = process.env.BIND_HOST || '127.0.0.1';
const base = process.env.PUBLIC_HOSTNAME || process.env.HOSTNAME || `http://127.0.0.1:${port}`;
const wsBase = base.replace(/^http/, 'ws');
const agentUrl = process.env.VOICE_AGENT_URL;
const apiKey = process.env.ASSEMBLYAI_API_KEY || '';
let active = 0;

const server = http.createServer((req, res) => {
  if (req.method === 'GET' && req.url === '/healthz') {
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(`{"status":"ok","active_calls":${active}}`);
    return;
  }
  if (req.method === 'POST' && req.url === '/twiml') {
    req.resume();
    req.on('end', () => {
      const token = Math.random().toString(16).slice(2);
      res.writeHead(200, { 'content-type': 'text/xml' });
      res.end(`<?xml version="1.0" encoding="UTF-8"?><Response><Connect><Stream url="${wsBase}/media-stream/${token}"/></Connect></Response>`);
    });
    return;
  }
  res.writeHead(404);
  res.end();
});

const wss = new WebSocketServer({ noServer: true, perMessageDeflate: false });
server.on('upgrade', (req, socket, head) => {
  if (!req.url.startsWith('/media-stream/')) { socket.destroy(); return; }
  wss.handleUpgrade(req, socket, head, (ws) => onCall(ws));
});

function onCall(twilio) {
  active++;
  let streamSid = null;
  let ready = false;
  let agent = null;
  const end = () => {
    if (agent && agent.readyState === WebSocket.OPEN) agent.send('{"type":"session.end"}');
  };
  twilio.on('message', (data) => {
    const msg = JSON.parse(data.toString());
    if (msg.event === 'media') {
      if (ready) agent.send(JSON.stringify({ type: 'input.audio', audio: msg.media.payload }));
    } else if (msg.event === 'start') {
      streamSid = msg.start.streamSid;
      agent = new WebSocket(agentUrl, { headers: { Authorization: `Bearer ${apiKey}` }, perMessageDeflate: false });
      agent.on('open', () => {
        agent.send(JSON.stringify({ type: 'session.update', session: {
          system_prompt: 'You are a helpful assistant.',
          input: { type: 'audio', format: { encoding: 'audio/pcmu' } },
          output: { type: 'audio', voice: 'ivy', format: { encoding: 'audio/pcmu' } } } }));
      });
      agent.on('message', (d) => {
        const ev = JSON.parse(d.toString());
        if (ev.type === 'reply.audio') {
          if (twilio.readyState === WebSocket.OPEN) {
            twilio.send(JSON.stringify({ event: 'media', streamSid, media: { payload: ev.data } }));
          }
        } else if (ev.type === 'session.ready') {
          ready = true;
        } else if (ev.type === 'input.speech.started') {
          if (twilio.readyState === WebSocket.OPEN) twilio.send(JSON.stringify({ event: 'clear', streamSid }));
        }
      });
      agent.on('close', () => { if (twilio.readyState === WebSocket.OPEN) twilio.close(1000); });
      agent.on('error', () => {});
    } else if (msg.event === 'stop') {
      end();
    }
  });
  twilio.on('close', () => { active--; end(); });
  twilio.on('error', () => {});
}

server.listen(port, host, () => console.log(`reference bridge on ${host}:${port}`));
process.on('SIGTERM', () => process.exit(0));

// A minimal MQTT 3.1.1 client over WebSocket (OASIS MQTT 3.1.1, section 6: WebSocket transport,
// subprotocol "mqtt", binary frames), enough for a read-only dashboard: CONNECT (optional
// username and password), SUBSCRIBE, receiving PUBLISH at QoS 0 and 1 (PUBACK), PINGREQ, and
// reconnecting with backoff. It never publishes. Packets may span or share WebSocket frames; a
// packet larger than maxPacket bytes or a malformed one closes the connection (and reconnects).

const CONNACK_ERRORS = {
  1: "unacceptable protocol version",
  2: "client identifier rejected",
  3: "server unavailable",
  4: "bad user name or password",
  5: "not authorized",
};

function utf8(text) {
  return new TextEncoder().encode(text);
}

function lengthPrefixed(bytes) {
  if (bytes.length > 0xffff) throw new Error("MQTT string longer than 65535 bytes");
  const out = new Uint8Array(2 + bytes.length);
  out[0] = bytes.length >> 8;
  out[1] = bytes.length & 0xff;
  out.set(bytes, 2);
  return out;
}

function remainingLength(n) {
  const out = [];
  do {
    let digit = n % 128;
    n = Math.floor(n / 128);
    if (n > 0) digit |= 0x80;
    out.push(digit);
  } while (n > 0);
  return out;
}

function packet(firstByte, ...parts) {
  const body = parts.reduce((sum, p) => sum + p.length, 0);
  const header = [firstByte, ...remainingLength(body)];
  const out = new Uint8Array(header.length + body);
  out.set(header, 0);
  let at = header.length;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

function u16(n) {
  return new Uint8Array([n >> 8, n & 0xff]);
}

export class MqttWsClient {
  /**
   * @param {string} url ws:// or wss:// URL of the broker's WebSockets listener
   * @param {object} options clientId, username, password, keepalive (s), maxPacket (bytes),
   *   onMessage(topic, Uint8Array payload, retained), onState(state, detail)
   */
  constructor(url, options = {}) {
    this.url = url;
    this.clientId = options.clientId || `ember-dash-${Math.random().toString(16).slice(2, 14)}`;
    this.username = options.username || "";
    this.password = options.password || "";
    this.keepalive = options.keepalive || 30;
    this.maxPacket = options.maxPacket || 4 * 1024 * 1024;
    this.onMessage = options.onMessage || (() => {});
    this.onState = options.onState || (() => {});
    this.subscriptions = []; // [filter, qos]
    this.pending = new Map(); // SUBSCRIBE packet id -> its filters
    this.connected = false;
    this.nextId = 1;
    this.buffer = new Uint8Array(0);
    this.socket = null;
    this.timer = null;
    this.retry = null;
    this.backoff = 0.5;
    this.closed = false;
  }

  connect() {
    this.closed = false;
    this.connected = false;
    this.onState("connecting", this.url);
    let socket;
    try {
      socket = new WebSocket(this.url, ["mqtt"]);
    } catch (err) {
      this.onState("error", String(err));
      this.scheduleReconnect();
      return;
    }
    socket.binaryType = "arraybuffer";
    this.socket = socket;
    this.buffer = new Uint8Array(0);
    socket.onopen = () => this.send(this.connectPacket());
    socket.onmessage = (event) => this.receive(new Uint8Array(event.data));
    socket.onerror = () => this.onState("error", "websocket error");
    socket.onclose = () => {
      this.connected = false;
      clearInterval(this.timer);
      this.timer = null;
      if (this.socket === socket) this.socket = null;
      if (!this.closed) {
        this.onState("disconnected", "connection closed");
        this.scheduleReconnect();
      }
    };
  }

  close() {
    this.closed = true;
    clearTimeout(this.retry);
    clearInterval(this.timer);
    if (this.socket && this.socket.readyState === WebSocket.OPEN) {
      this.send(new Uint8Array([0xe0, 0x00])); // DISCONNECT
    }
    if (this.socket) this.socket.close();
    this.socket = null;
  }

  subscribe(filter, qos = 0) {
    this.subscriptions.push([filter, Math.min(qos, 1)]);
    if (this.socket && this.connected) this.send(this.subscribePacket([[filter, qos]]));
  }

  scheduleReconnect() {
    clearTimeout(this.retry);
    const delay = this.backoff * 1000;
    this.backoff = Math.min(this.backoff * 2, 10);
    this.retry = setTimeout(() => this.connect(), delay);
  }

  send(bytes) {
    if (this.socket && this.socket.readyState === WebSocket.OPEN) this.socket.send(bytes);
  }

  fail(reason) {
    this.onState("error", reason);
    if (this.socket) this.socket.close();
  }

  connectPacket() {
    let flags = 0x02; // clean session
    const payload = [lengthPrefixed(utf8(this.clientId))];
    if (this.username) {
      flags |= 0x80;
      payload.push(lengthPrefixed(utf8(this.username)));
      if (this.password) {
        flags |= 0x40;
        payload.push(lengthPrefixed(utf8(this.password)));
      }
    }
    const variable = new Uint8Array([0, 4, 77, 81, 84, 84, 4, flags, ...u16(this.keepalive)]);
    return packet(0x10, variable, ...payload);
  }

  subscribePacket(pairs) {
    const id = this.nextId;
    this.nextId = (this.nextId % 0xffff) + 1;
    this.pending.set(id, pairs.map(([filter]) => filter));
    const parts = [u16(id)];
    for (const [filter, qos] of pairs) {
      parts.push(lengthPrefixed(utf8(filter)), new Uint8Array([qos]));
    }
    return packet(0x82, ...parts);
  }

  receive(chunk) {
    const joined = new Uint8Array(this.buffer.length + chunk.length);
    joined.set(this.buffer, 0);
    joined.set(chunk, this.buffer.length);
    let at = 0;
    while (at < joined.length) {
      // Fixed header: type and flags, then 1-4 bytes of remaining length.
      let length = 0;
      let multiplier = 1;
      let i = at + 1;
      let complete = false;
      for (; i < joined.length && i < at + 5; i++) {
        length += (joined[i] & 0x7f) * multiplier;
        multiplier *= 128;
        if ((joined[i] & 0x80) === 0) {
          complete = true;
          i++;
          break;
        }
      }
      if (!complete) {
        if (i >= at + 5) return this.fail("malformed remaining length");
        break; // the length itself is not all here yet
      }
      if (length > this.maxPacket) return this.fail(`packet of ${length} bytes refused`);
      if (i + length > joined.length) break; // wait for the rest
      this.handle(joined[at], joined.subarray(i, i + length));
      if (!this.socket) return; // handle() may have closed the connection
      at = i + length;
    }
    this.buffer = joined.slice(at);
  }

  handle(first, body) {
    const type = first >> 4;
    if (type === 2) {
      // CONNACK
      const code = body.length >= 2 ? body[1] : 255;
      if (code !== 0) {
        this.closed = code === 4 || code === 5; // retrying cannot fix credentials
        this.onState(this.closed ? "refused" : "error", CONNACK_ERRORS[code] || `code ${code}`);
        if (this.socket) this.socket.close();
        return;
      }
      this.connected = true;
      this.backoff = 0.5;
      this.onState("connected", this.url);
      if (this.subscriptions.length) this.send(this.subscribePacket(this.subscriptions));
      clearInterval(this.timer);
      this.timer = setInterval(() => this.send(new Uint8Array([0xc0, 0x00])), this.keepalive * 500);
    } else if (type === 3) {
      // PUBLISH
      const qos = (first >> 1) & 0x03;
      if (body.length < 2) return this.fail("short PUBLISH");
      const topicLength = (body[0] << 8) | body[1];
      let at = 2 + topicLength;
      if (at > body.length) return this.fail("PUBLISH topic overruns the packet");
      const topic = new TextDecoder().decode(body.subarray(2, at));
      if (qos > 1) return this.fail("QoS 2 PUBLISH, never subscribed for");
      if (qos === 1) {
        if (at + 2 > body.length) return this.fail("PUBLISH without a packet id");
        this.send(new Uint8Array([0x40, 0x02, body[at], body[at + 1]])); // PUBACK
        at += 2;
      }
      try {
        this.onMessage(topic, body.subarray(at), (first & 0x01) === 1);
      } catch (err) {
        console.error("message handler failed", topic, err);
      }
    } else if (type === 9) {
      // SUBACK: 0x80 means the broker refused a filter (an ACL, usually)
      if (body.length < 2) return this.fail("short SUBACK");
      const id = (body[0] << 8) | body[1];
      const filters = this.pending.get(id) || [];
      this.pending.delete(id);
      const refused = [];
      for (let k = 2; k < body.length; k++) {
        if (body[k] === 0x80) refused.push(filters[k - 2] ?? "?");
      }
      if (refused.length) this.onState("error", `subscription refused: ${refused.join(", ")}`);
    }
    // PINGRESP (13) and anything else a subscriber may get: nothing to do.
  }
}

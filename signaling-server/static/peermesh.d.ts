// Type declarations for /peermesh.js, the browser client of peermesh (wire protocol v1, link
// protocol version 4: lanes, and file transfer on the file lane).

export declare const PROTOCOL_VERSION: 1;
/** The link protocol version this client announces in its offers, answers and VERSION frames. */
export declare const LINK_VERSION: 4;
/** The app's lanes are numbered 0 to MAX_LANES - 1 (8 lanes; docs/PROTOCOL.md §8.8). */
export declare const MAX_LANES: 8;
/**
 * Lane 8 carries file transfers (docs/PROTOCOL.md §8.9): the library's, never the app's (send()
 * on it: PeermeshError 'invalid_lane'); used only towards peers of link protocol version 4 or more.
 */
export declare const FILE_LANE: 8;

/** A lane number, 0 to 7. Lane 0 always exists; others are configured with ConnectOptions.lanes. */
export type Lane = 0 | 1 | 2 | 3 | 4 | 5 | 6 | 7;

/**
 * How a lane is scheduled against the others (docs/PROTOCOL.md §8.8.3, as GameNetworkingSockets'
 * lanes).
 */
export interface LaneOptions {
  lane: Lane;
  /**
   * Lower goes first: while a lane of a lower number has reliable data ready, no lane of a
   * higher number sends any (0 to 255, default 0).
   */
  priority?: number;
  /** Share among the lanes of the same priority (deficit round robin; 1 to 65535, default 1). */
  weight?: number;
}
/** Largest unreliable message in bytes (16384). */
export declare const MAX_UNRELIABLE_SIZE: number;

/** A peer id assigned by the server (u32, never 0). */
export type PeerId = number;

/** `'server'`, or `'direct <local>/<remote>'` with the candidate types of the selected pair. */
export type Path = 'server' | `direct ${CandidateType}/${CandidateType}`;
export type CandidateType = 'host' | 'srflx' | 'prflx' | 'relay';

/**
 * Which direct paths a pair may use: 'any' (every candidate type), 'relay' (TURN relay
 * candidates only; no other address is ever sent to the peer), 'none' (the server path only; no
 * address is exchanged at all). A pair's policy is the strictest of both clients' own, their
 * tokens' and the group's.
 */
export type DirectPolicy = 'any' | 'relay' | 'none';

export interface Candidate {
  address: string;
  port: number;
  type: CandidateType;
}

export interface CandidatePair {
  local: Candidate;
  remote: Candidate;
}

export interface Member {
  peer: PeerId;
  name: string;
  /** User id (the token's `sub`) when the server requires tokens, else null. */
  user: string | null;
  /** The pair's direct policy: the strictest of this client's own and the server's for the pair. */
  direct: DirectPolicy;
}

export interface IceServer {
  urls: string[];
  username?: string;
  credential?: string;
}

export interface Limits {
  max_frame_bytes: number;
  max_groups_per_client: number;
  max_members_per_group: number;
}

export interface ConnectOptions {
  /** Display name: 1-64 bytes of UTF-8, no control, format or other invisible characters. */
  name: string;
  /** Server URL (ws://host:port/ws, or http(s)://host:port); default: this page's host. */
  url?: string;
  /**
   * This client's own limit on direct paths, sent to the server in hello (default 'any').
   * 'relay': relay-only PeerConnections (iceTransportPolicy 'relay'), only relay candidates
   * signaled or taken. 'none': no PeerConnection; offers are declined. `false` is the older
   * spelling of 'none', `true` of 'any'.
   */
  direct?: DirectPolicy | boolean;
  /** Older spelling of `direct: 'relay'`. */
  relayOnly?: boolean;
  /** Bytes of unacknowledged reliable data per link (64 KiB to 16 MiB, default 8 MiB). */
  sendWindow?: number;
  /** Largest reliable message (default 8 MiB, at most the send window). */
  maxMessageSize?: number;
  /** How long connect() waits for the server's welcome (ms, default 10000). */
  connectTimeout?: number;
  /** How long join()/leave() wait for the server (ms, default 10000). */
  requestTimeout?: number;
  /**
   * A direct path on which nothing at all has arrived for this long is given up: back to the
   * server path, and a new connection attempt (ms, default 3000; docs/PROTOCOL.md §8.7).
   */
  deadPathTimeoutMs?: number;
  /** Identity token (a JWT minted by the app's backend); required by servers run with an auth secret. */
  token?: string;
  /**
   * Reconnect by itself when the connection to the server is lost (default: on, 250 ms
   * doubling to 10 s, with jitter); false: the session ends ('close'). Within the server's
   * resume grace the same session goes on; otherwise a new one joins the groups again.
   */
  reconnect?: false | { initialDelayMs?: number; maxDelayMs?: number; maxAttempts?: number };
  /**
   * Lanes to send on besides lane 0 (which may be given a priority and weight here too). Each
   * reliable lane is an ordered stream of its own: a bulk transfer on one lane does not hold up
   * another. Lanes share the send window, each keeping a reserve of sendWindow / (2 × lanes),
   * so a lane's largest message is at least half the window. A peer without lanes (link
   * protocol version 2 or older) gets every lane on lane 0, each lane still in order.
   * Default: lane 0 only. Invalid entries: PeermeshError 'invalid_option'.
   */
  lanes?: LaneOptions[];
  /**
   * How the file lane (file transfers) is scheduled against the app's lanes. Default priority 1,
   * weight 1: below the app's lanes at their default priority 0, so chat goes first. The file
   * lane keeps no window reserve and holds at most half the send window.
   */
  fileLane?: { priority?: number; weight?: number };
}

export interface SendOptions {
  /** Default true: complete, in order, exactly once. false: best effort, at most 16384 bytes. */
  reliable?: boolean;
  /**
   * The lane of a reliable message (default 0): messages of one lane arrive in the order sent,
   * messages of different lanes in no particular order. A lane other than 0 must be configured
   * (ConnectOptions.lanes), else PeermeshError 'invalid_lane'. Unreliable messages have no lane
   * (ignored; they arrive with lane 0).
   */
  lane?: Lane;
}

/** Whether the peer has lanes: not known yet (its VERSION frame has not come), yes, or no. */
export type PeerLanes = 'unknown' | 'lanes' | 'lane0';

export interface LinkStats {
  path: Path;
  rtt: number | null;
  sentServer: number;
  sentDirect: number;
  recvServer: number;
  recvDirect: number;
  resent: number;
  duplicates: number;
  pathChanges: number;
  candidatesHost: number;
  candidatesSrflx: number;
  candidatesRelay: number;
  /** Unreliable messages sent split into UNRELIABLE_PART frames (direct path, link v2). */
  unreliableSplit: number;
  /** Split unreliable messages received complete. */
  unreliableJoined: number;
  /** UNRELIABLE_PART frames dropped as malformed, repeated or too long. */
  partsDropped: number;
  /** Incomplete split messages discarded (1 s old, or evicted to stay within 256 KiB of parts). */
  partsExpired: number;
  /** Direct paths given up because nothing arrived on them for deadPathTimeoutMs. */
  deadPaths: number;
  /** Reliable fragments sent and not yet acknowledged. */
  unacked: number;
  /** Bytes of the send window in use (every lane, and messages waiting for the peer's version). */
  windowUsed: number;
  /** Whether the peer has lanes ('lane0': everything goes on lane 0, sequenced as unreliable). */
  peerLanes: PeerLanes;
  /** The peer's link protocol version from its VERSION frame (null: none came); 4+ takes files. */
  peerVersion: number | null;
  /** Sequenced messages dropped on arrival: not newer than the newest delivered on their lane. */
  sequencedStale: number;
  /** Sequenced messages replaced by a newer one of their lane while the peer's version was unknown. */
  sequencedReplaced: number;
  /** Early reliable fragments dropped because the reorder buffer (all lanes) was full. */
  reorderFull: number;
  /** Reliable messages dropped because they grew past 16 MiB. */
  tooLarge: number;
}

export interface MemberEventDetail {
  group: string;
  peer: PeerId;
  name: string;
  /** User id (the token's `sub`) when the server requires tokens, else null (memberjoined only). */
  user?: string | null;
  /** The pair's direct policy (memberjoined only). */
  direct?: DirectPolicy;
}

export interface PathEventDetail {
  peer: PeerId;
  path: Path;
  pair: CandidatePair | null;
}

export interface MessageEventDetail {
  from: PeerId;
  /** The bytes as sent (a string was sent as UTF-8). */
  data: Uint8Array;
  reliable: boolean;
  /**
   * The lane it came on: the sender's lane for reliable and sequenced messages; 0 for plain
   * unreliable messages, and for everything from a peer without lanes.
   */
  lane: Lane;
  /** `data` decoded as UTF-8. */
  readonly text: string;
}

export interface NoDirectPathEventDetail {
  peer: PeerId;
  /** For people, e.g. 'not connected within 8s', 'ice failed', 'the peer does not take direct paths'. */
  reason: string;
}

export interface ServerErrorEventDetail {
  code: string;
  message: string;
  request?: string;
  group?: string;
  peer?: PeerId;
}

export interface CloseEventDetail {
  code: number;
  reason: string;
  /** true after client.close(). */
  byClient: boolean;
}

export interface GroupEventDetail {
  group: string;
}

export interface ReconnectingEventDetail {
  /** Attempt number, from 1. */
  attempt: number;
  /** Back-off before this attempt (ms). */
  delay: number;
}

export interface ReconnectedEventDetail {
  /** This client's peer id now (new after a new session). */
  peer: number;
  /** true: the same session went on (same peer id, groups, links; nothing lost). */
  resumed: boolean;
}

export interface UndeliveredEventDetail {
  /** The peer (its id in the old session). */
  peer: number;
  /** Reliable messages it had not acknowledged: they may or may not have arrived. */
  messages: number;
}

/** Progress of a file transfer. */
export interface FileProgress {
  /** Bytes done: handed to the link (sending), or received and checked (receiving). */
  done: number;
  total: number;
  /** Bytes per second since the transfer started. */
  rate: number;
  /** Seconds left at that rate, or null before a rate is known. */
  eta: number | null;
}

/**
 * A file transfer's error (a PeermeshError): code 'rejected', 'cancelled', 'io', 'disk_full',
 * 'too_large', 'hash_mismatch', 'protocol' (as the reference client's FileErrorCode), 'other'
 * (a code this client does not know: `wireCode`), 'unsupported' (the peer's link protocol version
 * is below 4) or 'peer_left' (the link ended: the peer left, or this session ended).
 */
export interface FileError extends PeermeshError {
  code: 'rejected' | 'cancelled' | 'io' | 'disk_full' | 'too_large' | 'hash_mismatch' | 'protocol' | 'other' | 'unsupported' | 'peer_left';
  /** The peer ended it (REJECT or CANCEL); `message` is its reason. */
  byPeer: boolean;
  /** The code byte of the peer's REJECT or CANCEL. */
  wireCode?: number;
}

export interface SentFile {
  name: string;
  size: number;
  /** SHA-256 of the whole file, hex. */
  sha256: string;
  /** Bytes sent: the size, less what the receiver already had (resumedFrom). */
  bytesSent: number;
  /** Where the receiver asked to start (0, or what it kept of an earlier transfer). */
  resumedFrom: number;
}

/** A file being sent (Client.sendFile). */
export interface OutgoingFile extends EventTarget {
  /** Transfer id: 16 hex digits (ids are the sender's, unique among its transfers to the peer). */
  readonly id: string;
  readonly peer: PeerId;
  readonly name: string;
  readonly size: number;
  /** Ends the transfer at both ends; `done` rejects with 'cancelled' (byPeer false). */
  cancel(): void;
  /** 'progress' events (at most one per 100 ms, and the last); returns an unsubscribe function. */
  on(type: 'progress', handler: (detail: FileProgress) => void): () => void;
  /** Resolves once the receiver has the whole file with its hash checked; rejects with a FileError. */
  readonly done: Promise<SentFile>;
}

export interface ReceivedFile {
  /** Transfer id (the sender's), 16 hex digits. */
  id: string;
  from: PeerId;
  /** The offered name, made safe (last path component, no reserved characters, ≤ 200 bytes). */
  name: string;
  size: number;
  /** SHA-256 of the whole file, hex: checked against the sender's. */
  sha256: string;
  /** The file, in memory. */
  blob: Blob;
}

/** The 'fileoffer' event's detail: answer with accept(), reject() or nothing (the sender waits). */
export interface FileOfferEventDetail {
  id: string;
  from: PeerId;
  /** The offered name, made safe as the reference client does (docs/PROTOCOL.md §8.9). */
  name: string;
  size: number;
  /** The whole file's SHA-256 as offered, hex (zeros: the sender did not know it). */
  sha256: string;
  /**
   * Receive it into memory: every chunk's hash and offset is checked, and the whole file's hash
   * at the end; resolves once it is complete (also a 'filereceived' event), rejects with a
   * FileError (also a 'filefailed' event). Resume is not offered (it starts at 0).
   */
  accept(): Promise<ReceivedFile>;
  /** Say no: the sender's transfer ends with 'rejected' and this reason. */
  reject(reason?: string): void;
  /** End the transfer at both ends (before or after accept()). */
  cancel(): void;
}

export interface FileProgressEventDetail extends FileProgress {
  id: string;
  peer: PeerId;
  direction: 'send' | 'receive';
  name: string;
}

export interface FileFailedEventDetail {
  id: string;
  peer: PeerId;
  direction: 'receive';
  name: string;
  code: FileError['code'];
  error: FileError;
}

export interface ClientEventMap {
  /**
   * A co-member offers a file. Without any 'fileoffer' listener, offers are rejected
   * ("not accepted").
   */
  fileoffer: CustomEvent<FileOfferEventDetail>;
  /** Progress of a transfer either way (at most one per 100 ms per transfer, and the last). */
  fileprogress: CustomEvent<FileProgressEventDetail>;
  /** A file accepted with accept() is complete, its hash checked. */
  filereceived: CustomEvent<ReceivedFile>;
  /** A file being received (or offered) ended without the file. */
  filefailed: CustomEvent<FileFailedEventDetail>;
  /** The connection was lost: attempt `attempt` to connect again starts after `delay` ms. */
  reconnecting: CustomEvent<ReconnectingEventDetail>;
  /** Connected again. */
  reconnected: CustomEvent<ReconnectedEventDetail>;
  /** After a new session, the client is in this group again ('memberjoined' follows for each member). */
  rejoined: CustomEvent<GroupEventDetail>;
  /** Reliable messages of a link that ended with the old session were not acknowledged. */
  undelivered: CustomEvent<UndeliveredEventDetail>;
  /** This client is now in a group: it joined, or the app's backend added it ('memberjoined' follows for each member). */
  groupjoined: CustomEvent<GroupEventDetail>;
  /** This client is no longer in a group: it left, or the backend removed it or destroyed the group. */
  groupleft: CustomEvent<GroupEventDetail>;
  memberjoined: CustomEvent<MemberEventDetail>;
  memberleft: CustomEvent<MemberEventDetail>;
  path: CustomEvent<PathEventDetail>;
  message: CustomEvent<MessageEventDetail>;
  nodirectpath: CustomEvent<NoDirectPathEventDetail>;
  error: CustomEvent<ServerErrorEventDetail>;
  close: CustomEvent<CloseEventDetail>;
}

export declare class PeermeshError extends Error {
  /**
   * A server error code (invalid_name, already_member, not_member, group_full, ...) or one of
   * this module's: invalid_url, invalid_option, invalid_group, connect, timeout,
   * version_mismatch, closed, unknown_peer, too_large, would_block, invalid_lane (a lane
   * not configured with ConnectOptions.lanes), and a file transfer's (FileError).
   */
  code: string;
  request?: string;
  group?: string;
}

export declare class Client extends EventTarget {
  readonly url: string;
  readonly name: string;
  /** This client's own direct policy (from the `direct` option). */
  readonly directPolicy: DirectPolicy;
  readonly peerId: PeerId;
  readonly iceServers: IceServer[];
  readonly limits: Limits | null;
  readonly closed: boolean;
  readonly groups: string[];

  /** Listen to an event; the handler gets the detail. Returns an unsubscribe function. */
  on<K extends keyof ClientEventMap>(type: K, handler: (detail: ClientEventMap[K]['detail']) => void): () => void;
  addEventListener<K extends keyof ClientEventMap>(
    type: K,
    listener: (ev: ClientEventMap[K]) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | AddEventListenerOptions): void;
  removeEventListener<K extends keyof ClientEventMap>(
    type: K,
    listener: (ev: ClientEventMap[K]) => void,
    options?: boolean | EventListenerOptions,
  ): void;
  removeEventListener(type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | EventListenerOptions): void;

  /** Join a group; resolves to its other members (a 'memberjoined' event comes for each first). */
  join(group: string): Promise<Member[]>;
  /** Leave a group ('memberleft' for each of its members). */
  leave(group: string): Promise<void>;
  /** The other members of a group this client is in. */
  members(group: string): Member[];
  nameOf(peer: PeerId): string | undefined;
  /**
   * Resolves once the message is handed to the link (waits while the lane's share of the send
   * window is full).
   */
  send(peer: PeerId, data: string | ArrayBuffer | ArrayBufferView, options?: SendOptions): Promise<void>;
  /** Like send(), but throws PeermeshError 'would_block' instead of waiting. */
  trySend(peer: PeerId, data: string | ArrayBuffer | ArrayBufferView, options?: SendOptions): void;
  /**
   * A sequenced unreliable message on a configured lane (at most 16384 bytes): best effort, and
   * the peer drops it if it already delivered a newer one of that lane (state updates). A peer
   * without lanes gets it as a plain unreliable message. Until the peer's link version is known
   * (about a round trip after the link starts), only the newest one per lane waits.
   * PeermeshError 'invalid_lane', 'too_large'.
   */
  sendSequenced(peer: PeerId, lane: Lane, data: string | ArrayBuffer | ArrayBufferView): void;
  broadcast(group: string, data: string | ArrayBuffer | ArrayBufferView, options?: SendOptions): Promise<void>;
  /**
   * Send a file on the file lane (docs/PROTOCOL.md §8.9): hashed first (SHA-256, read a slice
   * at a time, never whole in memory), offered, then streamed in 256 KiB chunks, each with its
   * hash, once the peer accepts (from the offset it asks for: a native receiver may resume).
   * `name` defaults to file.name. Returns at once; see OutgoingFile.done for the outcome.
   * Throws PeermeshError 'unknown_peer' / 'closed', or a TypeError for something not a Blob.
   */
  sendFile(peer: PeerId, file: Blob, options?: { name?: string }): OutgoingFile;
  /** Resolves once every reliable message sent so far is acknowledged. */
  flush(): Promise<void>;
  path(peer: PeerId): Path;
  /** Smoothed RTT in ms on the current path, or null before the first sample. */
  rtt(peer: PeerId): number | null;
  candidatePair(peer: PeerId): CandidatePair | null;
  stats(peer: PeerId): LinkStats;
  close(): Promise<void>;
}

export declare function connect(options: ConnectOptions): Promise<Client>;
export declare function connect(url: string | undefined, options: ConnectOptions): Promise<Client>;
export declare function isValidName(name: string): boolean;
export declare function isValidGroup(group: string): boolean;

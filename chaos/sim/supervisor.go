package main

import (
	"context"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"net"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"

	pb "openshell.test/chaos/sim/pb"
)

// Linux's IP_BIND_ADDRESS_NO_PORT (not in the syscall package): with a source address bound, the
// port is then chosen at connect() per 4-tuple, so TIME_WAITs of a storm do not exhaust one address.
const ipBindAddressNoPort = 24

// cfg is what every simulated supervisor of this process shares.
type cfg struct {
	addrs          []string
	srcIPs         []net.IP
	caps           []string
	jitter         float64
	connectTimeout time.Duration
	eventEvery     time.Duration
	eventsPerTick  int
	maxInflight    int
	batchMax       int
	upstream       bool // upstream's reconnect: 1 s doubling to 30 s, no jitter, never reset
	addrFile       string
	addrMu         sync.Mutex
	addrMtime      time.Time
	addrSize       int64
}

// The real supervisor's reconnect policy (supervisor/session.py, docs/protocol.md).
const (
	reconnectInitial = 500 * time.Millisecond
	reconnectMax     = 30 * time.Second
	healthySession   = 10 * time.Second
	retryAfterCap    = 300 * time.Second
	upstreamInitial  = time.Second
	upstreamMinBeat  = 5 * time.Second
)

var writing atomic.Bool

// endpoints are the addresses an attempt picks from: -addr, or with -addr-file the file's current
// comma-separated list (re-read when it changes), as a Service's endpoints follow the ready pods.
func (c *cfg) endpoints() []string {
	if c.addrFile == "" {
		return c.addrs
	}
	c.addrMu.Lock()
	defer c.addrMu.Unlock()
	if fi, err := os.Stat(c.addrFile); err == nil && (fi.ModTime() != c.addrMtime || fi.Size() != c.addrSize) {
		if raw, err := os.ReadFile(c.addrFile); err == nil {
			if list := splitList(string(raw)); len(list) > 0 {
				c.addrs, c.addrMtime, c.addrSize = list, fi.ModTime(), fi.Size()
			}
		}
	}
	return c.addrs
}

type sup struct {
	c         *cfg
	idx       int
	instance  string
	connEpoch uint64
	j         *journal
	// Unix ms of the last accepted hello: after a storm, when this supervisor resumed.
	lastAccept atomic.Int64
	// The gateway's reconnect window (ns; SessionAccepted / GatewayHeartbeat reconnect_window_ms).
	window atomic.Int64
}

// outcome of one attempt: how the next wait is chosen.
type outcome struct {
	accepted   bool
	lasted     time.Duration
	retryAfter time.Duration // SessionRejected.retry_after_ms
	hintWindow time.Duration // ReconnectHint.delay_window_ms
	hinted     bool
	answered   bool // the gateway rejected the hello: it is there (the supervisor's SessionEnded.answered)
}

func (s *sup) dial(addr string) (*grpc.ClientConn, error) {
	src := s.c.srcIPs[s.idx%len(s.c.srcIPs)]
	dialer := func(ctx context.Context, a string) (net.Conn, error) {
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: src}, Control: func(_, _ string, rc syscall.RawConn) error {
			var serr error
			if err := rc.Control(func(fd uintptr) {
				serr = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_IP, ipBindAddressNoPort, 1)
			}); err != nil {
				return err
			}
			return serr
		}}
		return d.DialContext(ctx, "tcp", a)
	}
	// One ClientConn per supervisor: one TCP connection, as one pod has. Small buffers: thousands of them.
	return grpc.NewClient("passthrough:///"+addr,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(dialer),
		grpc.WithDisableServiceConfig(),
		grpc.WithReadBufferSize(8<<10),
		grpc.WithWriteBufferSize(8<<10),
		grpc.WithSharedWriteBuffer(true),
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 20 * time.Second, Timeout: 10 * time.Second}),
	)
}

func (s *sup) interval(ms uint32) time.Duration {
	d := time.Duration(ms) * time.Millisecond
	if s.c.upstream && d < upstreamMinBeat {
		d = upstreamMinBeat
	}
	return d
}

// session runs one attempt and, if accepted, its session until it ends.
func (s *sup) session(ctx context.Context) (o outcome, err error) {
	addrs := s.c.endpoints()
	addr := addrs[mrand.IntN(len(addrs))]
	conn, err := s.dial(addr)
	if err != nil {
		return o, err
	}
	defer conn.Close()
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := pb.NewOpenShellClient(conn).ConnectSupervisor(sctx)
	if err != nil {
		return o, err
	}
	s.connEpoch++
	first, last := s.j.bounds()
	hello := &pb.SupervisorHello{
		SandboxId: s.j.id, InstanceId: s.instance, ConnectionEpoch: s.connEpoch,
		Capabilities: s.c.caps, JournalEpoch: s.j.epoch,
		JournalFirstSequence: first, JournalLastSequence: last, SupervisorVersion: "chaos-sim/1",
	}
	if err := stream.Send(&pb.SupervisorMessage{Payload: &pb.SupervisorMessage_Hello{Hello: hello}}); err != nil {
		return o, err
	}
	// The answer must come within the connect timeout, as the real supervisor's gateway.connect_timeout_s.
	type answer struct {
		m   *pb.GatewayMessage
		err error
	}
	fc := make(chan answer, 1)
	go func() { m, err := stream.Recv(); fc <- answer{m, err} }()
	var m *pb.GatewayMessage
	select {
	case a := <-fc:
		if a.err != nil {
			// UNAVAILABLE / RESOURCE_EXHAUSTED may carry gRPC's retry pushback: honoured as retry_after_ms.
			o.retryAfter = pushback(stream.Trailer())
			return o, a.err
		}
		m = a.m
	case <-time.After(s.c.connectTimeout):
		st.connectTimeouts.Add(1)
		return o, errors.New("connect timeout")
	case <-ctx.Done():
		return o, ctx.Err()
	}
	if rj := m.GetSessionRejected(); rj != nil {
		o.answered = true
		noteRejected(rj.Code.String())
		o.retryAfter = time.Duration(rj.RetryAfterMs) * time.Millisecond
		return o, fmt.Errorf("rejected %v: %s", rj.Code, rj.Reason)
	}
	acc := m.GetSessionAccepted()
	if acc == nil {
		violation("%s: first answer neither accepted nor rejected: %v", s.j.id, m)
		return o, errors.New("bad first answer")
	}
	start := time.Now()
	o.accepted = true
	defer func() { o.lasted = time.Since(start) }()
	st.accepted.Add(1)
	s.lastAccept.Store(start.UnixMilli())
	s.window.Store(int64(time.Duration(acc.ReconnectWindowMs) * time.Millisecond))
	ms := acc.HeartbeatIntervalMs
	if ms == 0 {
		ms = acc.HeartbeatIntervalSecs * 1000
	}
	var intervalNs atomic.Int64
	intervalNs.Store(int64(s.interval(ms)))
	s.j.resume(acc.ResumeAfterSequence)
	st.up.Add(1)
	defer st.up.Add(-1)

	var sendMu sync.Mutex
	send := func(msg *pb.SupervisorMessage) error {
		sendMu.Lock()
		defer sendMu.Unlock()
		return stream.Send(msg)
	}
	var inflight atomic.Int64
	kick := make(chan struct{}, 1)
	sendBatches := func() error {
		for inflight.Load() < int64(s.c.maxInflight) {
			recs := s.j.nextBatch(s.c.batchMax)
			if len(recs) == 0 {
				return nil
			}
			evs := make([]*pb.Event, len(recs))
			now := time.Now().UnixMilli()
			for i, r := range recs {
				evs[i] = &pb.Event{Sequence: r.seq, TimestampMs: now,
					Kind: &pb.Event_Log{Log: &pb.LogEvent{Stream: pb.LogStream_LOG_STREAM_STDOUT, Message: r.msg}}}
			}
			inflight.Add(1)
			if err := send(&pb.SupervisorMessage{Payload: &pb.SupervisorMessage_Events{
				Events: &pb.EventBatch{JournalEpoch: s.j.epoch, Events: evs}}}); err != nil {
				return err
			}
		}
		return nil
	}

	var pending sync.Map // sent_unix_ms -> monotonic send time
	type ended struct {
		err    error
		hint   *pb.ReconnectHint
		reject *pb.SessionRejected
	}
	done := make(chan ended, 1)
	var lastFromGateway atomic.Int64
	lastFromGateway.Store(time.Now().UnixNano())
	go func() {
		for {
			m, err := stream.Recv()
			if err != nil {
				done <- ended{err: err}
				return
			}
			lastFromGateway.Store(time.Now().UnixNano())
			switch p := m.Payload.(type) {
			case *pb.GatewayMessage_Heartbeat:
				if w := p.Heartbeat.ReconnectWindowMs; w > 0 {
					s.window.Store(int64(time.Duration(w) * time.Millisecond))
				}
				if v, ok := pending.LoadAndDelete(p.Heartbeat.EchoUnixMs); ok {
					d := time.Since(v.(time.Time))
					st.rttAll.add(d)
					st.rttWin.add(d)
					st.hbEchoed.Add(1)
				}
			case *pb.GatewayMessage_EventAck:
				s.j.ack(p.EventAck.JournalEpoch, p.EventAck.AckedThroughSequence)
				inflight.Add(-1)
				select {
				case kick <- struct{}{}:
				default:
				}
			case *pb.GatewayMessage_SessionUpdate:
				st.updates.Add(1)
				if ms := p.SessionUpdate.HeartbeatIntervalMs; ms > 0 {
					intervalNs.Store(int64(s.interval(ms)))
				}
			case *pb.GatewayMessage_SessionRejected:
				done <- ended{reject: p.SessionRejected}
				return
			case *pb.GatewayMessage_Reconnect:
				done <- ended{hint: p.Reconnect}
				return
			}
		}
	}()

	if err := sendBatches(); err != nil {
		return o, err
	}
	nextBeat := func() time.Duration {
		iv := time.Duration(intervalNs.Load())
		if s.c.upstream {
			return iv // upstream beats on a fixed ticker
		}
		return time.Duration(float64(iv) * (1 + s.c.jitter*(2*mrand.Float64()-1)))
	}
	delay := nextBeat()
	hb := time.NewTimer(delay)
	defer hb.Stop()
	var evTick <-chan time.Time
	if s.c.eventEvery > 0 {
		t := time.NewTicker(s.c.eventEvery)
		defer t.Stop()
		evTick = t.C
	}
	for {
		select {
		case <-ctx.Done():
			return o, nil
		case e := <-done:
			switch {
			case e.hint != nil:
				st.hints.Add(1)
				o.hinted = true
				o.hintWindow = time.Duration(e.hint.DelayWindowMs) * time.Millisecond
				return o, fmt.Errorf("reconnect hint: %s", e.hint.Reason)
			case e.reject != nil:
				noteRejected(e.reject.Code.String())
				o.retryAfter = time.Duration(e.reject.RetryAfterMs) * time.Millisecond
				return o, fmt.Errorf("rejected mid-session %v: %s", e.reject.Code, e.reject.Reason)
			}
			o.retryAfter = pushback(stream.Trailer())
			return o, e.err
		case <-hb.C:
			// Stale after three intervals without a word from the gateway, as the supervisor; the gateway
			// only answers beats, so the beat just due (set before a SessionUpdate shortened the
			// interval) counts too.
			bound := 3 * max(time.Duration(intervalNs.Load()), delay)
			if time.Since(time.Unix(0, lastFromGateway.Load())) > bound {
				return o, errors.New("gateway stale")
			}
			now := time.Now()
			ms := now.UnixMilli()
			pending.Store(ms, now)
			st.hbSent.Add(1)
			if err := send(&pb.SupervisorMessage{Payload: &pb.SupervisorMessage_Heartbeat{
				Heartbeat: &pb.SupervisorHeartbeat{SentUnixMs: ms}}}); err != nil {
				return o, err
			}
			delay = nextBeat()
			hb.Reset(delay)
		case <-evTick:
			if !writing.Load() {
				continue
			}
			s.j.append(s.c.eventsPerTick)
			if err := sendBatches(); err != nil {
				return o, err
			}
		case <-kick:
			if err := sendBatches(); err != nil {
				return o, err
			}
		}
	}
}

// pushback reads the grpc-retry-pushback-ms trailer (0 when absent or not a number).
func pushback(md metadata.MD) time.Duration {
	for _, v := range md.Get("grpc-retry-pushback-ms") {
		if ms, err := strconv.ParseInt(v, 10, 64); err == nil && ms > 0 {
			return time.Duration(ms) * time.Millisecond
		}
	}
	return 0
}

// wait chooses the pause before the next attempt, as the real supervisor does (or upstream's, with -unjittered).
func (s *sup) wait(o outcome, failures int) (time.Duration, int) {
	if o.hinted {
		// A ReconnectHint: leave, reconnect within the window, no backoff.
		return time.Duration(mrand.Int64N(int64(o.hintWindow) + 1)), 0
	}
	var w time.Duration
	if s.c.upstream {
		// Upstream: 1 s doubling to 30 s, no jitter, never reset by a healthy session.
		w = min(upstreamInitial<<min(failures, 20), reconnectMax)
		failures++
	} else {
		if o.accepted && o.lasted >= healthySession {
			failures = 0
		}
		ceil := min(reconnectInitial<<min(failures, 20), reconnectMax)
		// Nobody answered: spread over the gateway's reconnect window, as the supervisor does.
		// Not after a healthy session: its first redial comes at once, as the supervisor's restart.
		healthy := o.accepted && o.lasted >= healthySession
		if win := min(time.Duration(s.window.Load()), reconnectMax); !o.answered && !healthy && win > ceil {
			ceil = win
		}
		w = time.Duration(mrand.Int64N(int64(ceil) + 1)) // full jitter
		failures++
	}
	if o.retryAfter > 0 {
		ra := min(o.retryAfter, retryAfterCap)
		w = max(w, time.Duration(float64(ra)*(1+0.2*mrand.Float64())))
	}
	return w, failures
}

func (s *sup) run(ctx context.Context) {
	failures := 0
	for ctx.Err() == nil {
		st.attempts.Add(1)
		o, err := s.session(ctx)
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			noteErr(err)
		}
		if !o.accepted {
			st.failedAttempts.Add(1)
		}
		var w time.Duration
		w, failures = s.wait(o, failures)
		select {
		case <-ctx.Done():
			return
		case <-time.After(w):
		}
	}
}

package main

import (
	"fmt"
	"sync"
)

type record struct {
	seq uint64
	msg string
}

// journal is a supervisor's in-memory journal (its "disk": kept across reconnects). It holds the
// records not yet acknowledged and checks every answer of the gateway against what was written.
type journal struct {
	mu          sync.Mutex
	id          string
	epoch       string
	written     uint64   // last sequence written
	acked       uint64   // highest acknowledged: must never go back, across sessions too
	pending     []record // unacknowledged records, in order
	sentThrough uint64   // highest sequence sent in this session
}

func (j *journal) append(k int) {
	j.mu.Lock()
	defer j.mu.Unlock()
	for range k {
		j.written++
		j.pending = append(j.pending, record{seq: j.written, msg: fmt.Sprintf("%s line %d", j.id, j.written)})
	}
	st.eventsWritten.Add(int64(k))
}

// bounds are the hello's journal_first_sequence / journal_last_sequence (0, 0 when empty).
func (j *journal) bounds() (first, last uint64) {
	j.mu.Lock()
	defer j.mu.Unlock()
	if len(j.pending) > 0 {
		first = j.pending[0].seq
	}
	return first, j.written
}

// resume checks SessionAccepted.resume_after_sequence: the gateway must hold at least what it
// acknowledged (else it lost events) and nothing never written (else it invented some).
func (j *journal) resume(after uint64) {
	j.mu.Lock()
	defer j.mu.Unlock()
	st.checks.Add(1)
	if after < j.acked {
		violation("%s: resume_after %d below acknowledged %d (lost)", j.id, after, j.acked)
	}
	if after > j.written {
		violation("%s: resume_after %d above written %d", j.id, after, j.written)
		after = j.written
	}
	j.trimLocked(after)
	j.sentThrough = after
}

// ack checks an EventAck: our epoch, never going back, never above what this session sent.
func (j *journal) ack(epoch string, through uint64) {
	j.mu.Lock()
	defer j.mu.Unlock()
	st.checks.Add(1)
	switch {
	case epoch != j.epoch:
		violation("%s: ack of epoch %q, ours %q", j.id, epoch, j.epoch)
	case through < j.acked:
		violation("%s: ack %d went back from %d", j.id, through, j.acked)
	case through > j.sentThrough:
		violation("%s: ack %d above sent %d", j.id, through, j.sentThrough)
	default:
		j.trimLocked(through)
	}
}

func (j *journal) trimLocked(through uint64) {
	if through > j.acked {
		st.eventsAcked.Add(int64(through - j.acked))
		j.acked = through
	}
	i := 0
	for i < len(j.pending) && j.pending[i].seq <= through {
		i++
	}
	j.pending = j.pending[i:]
}

// nextBatch takes up to max records not yet sent in this session.
func (j *journal) nextBatch(max int) []record {
	j.mu.Lock()
	defer j.mu.Unlock()
	var out []record
	for _, r := range j.pending {
		if r.seq <= j.sentThrough {
			continue
		}
		out = append(out, r)
		if len(out) >= max {
			break
		}
	}
	if len(out) > 0 {
		j.sentThrough = out[len(out)-1].seq
	}
	return out
}

func (j *journal) final() (written, acked uint64) {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.written, j.acked
}

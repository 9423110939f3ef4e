// Activity per actor: when it was last used and how many connections are open to it. The router feeds it;
// the idle policy and the scheduler read it. In memory: activity is a property of this process's traffic.
export interface ActivityRecord {
  lastActivity: number;
  openConnections: number;
}

export class ActivityTracker {
  private readonly records = new Map<string, ActivityRecord>();

  private record(key: string): ActivityRecord {
    let r = this.records.get(key);
    if (!r) {
      r = { lastActivity: Date.now(), openConnections: 0 };
      this.records.set(key, r);
    }
    return r;
  }

  touch(key: string): void {
    this.record(key).lastActivity = Date.now();
  }

  opened(key: string): void {
    const r = this.record(key);
    r.openConnections++;
    r.lastActivity = Date.now();
  }

  closed(key: string): void {
    const r = this.record(key);
    r.openConnections = Math.max(0, r.openConnections - 1);
    r.lastActivity = Date.now();
  }

  get(key: string): ActivityRecord | undefined {
    return this.records.get(key);
  }

  forget(key: string): void {
    this.records.delete(key);
  }
}

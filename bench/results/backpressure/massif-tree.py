import re,sys,os
fn=sys.argv[1]; maxdepth=int(sys.argv[2]) if len(sys.argv)>2 else 2
lines=open(fn).read().split('\n')
snaps=[]
for i,l in enumerate(lines):
    if l.startswith('snapshot='):
        heap=int(lines[i+3].split('=')[1]); extra=int(lines[i+4].split('=')[1]); kind=lines[i+6].split('=')[1]
        snaps.append((i,heap,extra,kind))
print('snapshots',len(snaps),'heap series (KB):',[s[1]//1024 for s in snaps])
det=[s for s in snaps if s[3] in ('detailed','peak')]
which=sys.argv[3] if len(sys.argv)>3 else 'max'
best=max(det,key=lambda s:s[1]) if which=='max' else det[int(which)]
print('chosen',best[1],'extra',best[2],best[3])
i=best[0]+7
while i<len(lines) and not lines[i].startswith('snapshot='):
    m=re.match(r'(\s*)n(\d+): (\d+) (.*)',lines[i])
    if m and len(m.group(1))<=maxdepth and int(m.group(3))>50000:
        print(('  '*len(m.group(1)))+m.group(3)+' '+re.sub(r'^0x[0-9A-F]+: ','',m.group(4))[:160])
    i+=1
